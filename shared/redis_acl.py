"""``emotion-stream redis-acl``: the Redis users of deploy/redis/users.acl, with passwords, for one deployment.

The template names each user's rights once, for the key prefix ``$prefix``; this writes the file
Redis loads (``--aclfile``: comments dropped, since Redis refuses them there) with a fresh
random password per user, and one ``<user>.env`` per user holding ``ES_REDIS__USERNAME`` and
``ES_REDIS__PASSWORD`` for that service (compose ``env_file``, or a Kubernetes Secret). Passwords
already written to ``<user>.env`` are kept, so running it again changes nothing.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from pathlib import Path
from string import Template

# The template sits in the source tree beside the compose and Kubernetes files that use it.
REPO_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "redis" / "users.acl"
USERS = ("admin", "ingest", "detect", "classify", "web", "events", "mqtt", "keda")
PREFIX = re.compile(r"^[A-Za-z0-9_.-]+$")


def render(template: str, passwords: dict[str, str], prefix: str = "es") -> str:
    """The ACL file: the template's user lines with prefix and passwords filled in, comments dropped."""
    if not PREFIX.match(prefix):
        raise ValueError(f"prefix {prefix!r}: letters, digits, '_', '.' and '-' only")
    values = {"prefix": prefix, **{f"{user}_password": pw for user, pw in passwords.items()}}
    lines = [line for line in template.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(Template(line).substitute(values) for line in lines) + "\n"


def _password(env_file: Path) -> str:
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            if line.startswith("ES_REDIS__PASSWORD="):
                return line.split("=", 1)[1]
    return secrets.token_hex(24)


def write(out: Path, template: Path, prefix: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    passwords = {user: _password(out / f"{user}.env") for user in USERS}
    written = []
    for user, password in passwords.items():
        path = out / f"{user}.env"
        path.write_text(f"ES_REDIS__USERNAME={user}\nES_REDIS__PASSWORD={password}\n")
        path.chmod(0o600)
        written.append(path)
    acl = out / "users.acl"
    acl.write_text(render(template.read_text(), passwords, prefix))
    acl.chmod(0o644)  # read by the redis-server user of the container; hold it as a secret
    return [acl, *written]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="emotion-stream redis-acl",
                                description="Write the Redis ACL file and each service's Redis credentials.")
    p.add_argument("--out", type=Path, default=Path("deploy/redis/secrets"),
                   help="folder for users.acl and the <user>.env files (default: deploy/redis/secrets, not in git)")
    p.add_argument("--template", type=Path, default=REPO_TEMPLATE, help="the ACL template (deploy/redis/users.acl)")
    p.add_argument("--prefix", default="es", help="the pipeline's key prefix (redis.prefix)")
    args = p.parse_args(argv)
    try:
        written = write(args.out, args.template, args.prefix)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
