#!/usr/bin/env node
// Reads emotion-stream events from Redis through a consumer group of its own, decodes every field
// of the msgpack payload (docs/wire-format.json describes them), prints one JSON line per event and
// acks each entry after its line was written. Entries it cannot decode are reported on stderr,
// counted, and acked (they would fail the same way again).
//
//   node consumer.js --redis-url redis://127.0.0.1:6379/0 [--prefix es] [--group node]
//                    [--consumer NAME] [--from start|now] [--count N] [--idle-exit-ms MS]
//
// Like the Python client, a restart under the same consumer name first reads the entries it had
// received but not acked, so an event may be printed twice (same event_id), never skipped.

import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { decode } from "@msgpack/msgpack";
import Redis from "ioredis";

const HERE = dirname(fileURLToPath(import.meta.url));
const WIRE_FORMAT = join(HERE, "..", "..", "docs", "wire-format.json");

class DecodeError extends Error {
  constructor(reason, detail) {
    super(`${reason}: ${detail}`);
    this.reason = reason;
  }
}

function parseArgs(argv) {
  const opts = { redisUrl: "redis://127.0.0.1:6379/0", prefix: "es", group: "node", consumer: `${hostname()}-node`,
    from: "start", count: 0, idleExitMs: 0, blockMs: 500 };
  const names = { "--redis-url": "redisUrl", "--prefix": "prefix", "--group": "group", "--consumer": "consumer",
    "--from": "from", "--count": "count", "--idle-exit-ms": "idleExitMs", "--block-ms": "blockMs" };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${argv[i]} (options: ${Object.keys(names).join(" ")})`);
    }
    opts[key] = ["count", "idleExitMs", "blockMs"].includes(key) ? Number(argv[i + 1]) : argv[i + 1];
  }
  if (!["start", "now"].includes(opts.from)) throw new Error(`--from ${opts.from}: use start or now`);
  return opts;
}

// The wire format document names the stream and the versions this consumer can read.
function loadWireFormat() {
  const doc = JSON.parse(readFileSync(WIRE_FORMAT, "utf8"));
  return {
    eventsKey: (prefix) => doc["x-streams"].events.key.replace("<prefix>", prefix),
    entryField: doc["x-entry-field"],
    versions: new Set(Object.keys(doc["x-versions"]).map(Number)),
  };
}

// ---------------------------------------------------------------- decoding

function field(obj, key, check, what) {
  if (!(key in obj)) throw new DecodeError("missing_field", `field '${key}' missing`);
  const value = obj[key];
  if (!check(value)) throw new DecodeError("bad_field", `field '${key}' is not ${what}`);
  return value;
}

const isStr = (v) => typeof v === "string";
const isInt = (v) => typeof v === "number" && Number.isInteger(v);
const isNonNegInt = (v) => isInt(v) && v >= 0;
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const isBox = (v) => Array.isArray(v) && v.length === 4 && v.every(isInt) && v[2] > 0 && v[3] > 0;

function zones(obj) {
  const value = obj.z ?? [];
  if (!Array.isArray(value) || value.length > 16 || !value.every((z) => isStr(z) && z.length > 0 && z.length <= 32)) {
    throw new DecodeError("bad_field", "zones must be at most 16 names of 1-32 characters");
  }
  return value;
}

function decodeEvent(payload, versions) {
  let obj;
  try {
    obj = decode(payload);
  } catch (err) {
    throw new DecodeError("garbage", `not msgpack (${err.message})`);
  }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw new DecodeError("garbage", "payload is not a msgpack map");
  }
  if (!versions.has(obj.v)) throw new DecodeError("schema_version", `schema version ${obj.v}`);
  if (obj.k !== "event") throw new DecodeError("wrong_kind", `message kind ${obj.k}`);
  const classes = field(obj, "cls", (v) => Array.isArray(v) && v.every(isStr), "a list of strings");
  const probs = field(obj, "p", (v) => Array.isArray(v) && v.length === classes.length && v.every(isNum),
    "one finite number per class");
  const tid = obj.tid;
  const event = {
    schema_version: obj.v,
    event_id: field(obj, "id", isStr, "a string"),
    camera: field(obj, "cam", (v) => isStr(v) && v.length > 0, "a non-empty string"),
    seq: field(obj, "seq", isNonNegInt, "a non-negative integer"),
    face: field(obj, "face", isNonNegInt, "a non-negative integer"),
    capture_ts: field(obj, "ts", isNum, "a finite number"),
    publish_ts: field(obj, "pts", isNum, "a finite number"),
    latency_ms: 0,
    box: field(obj, "b", isBox, "4 integers with a positive size"),
    label: field(obj, "l", isStr, "a string"),
    score: field(obj, "s", isNum, "a finite number"),
    probabilities: Object.fromEntries(classes.map((c, i) => [c, probs[i]])),
    model_version: field(obj, "mv", isStr, "a string"),
    track_id: isInt(tid) ? tid : null,
  };
  event.latency_ms = Math.round((event.publish_ts - event.capture_ts) * 100000) / 100;
  if (obj.v >= 2) event.zones = zones(obj);
  return event;
}

// ---------------------------------------------------------------- reading

async function ensureGroup(redis, stream, group, from) {
  try {
    await redis.xgroup("CREATE", stream, group, from === "start" ? "0" : "$", "MKSTREAM");
  } catch (err) {
    if (!String(err.message).includes("BUSYGROUP")) throw err;
  }
}

async function readBatch(redis, opts, stream, position) {
  const args = ["GROUP", opts.group, opts.consumer, "COUNT", 256];
  if (position === ">") args.push("BLOCK", opts.blockMs);
  const reply = await redis.xreadgroupBuffer(...args, "STREAMS", stream, position);
  if (!reply) return [];
  return reply[0][1].map(([id, fields]) => {
    const values = {};
    for (let i = 0; i + 1 < fields.length; i += 2) values[fields[i].toString()] = fields[i + 1];
    return { id: id.toString(), values };
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const wire = loadWireFormat();
  const stream = wire.eventsKey(opts.prefix);
  const redis = new Redis(opts.redisUrl, { maxRetriesPerRequest: null, lazyConnect: true });
  await redis.connect();
  await ensureGroup(redis, stream, opts.group, opts.from);
  let printed = 0;
  let skipped = 0;
  let ownPending = true; // first the entries this consumer received before a restart
  let idleSince = Date.now();
  while (opts.count <= 0 || printed < opts.count) {
    const entries = await readBatch(redis, opts, stream, ownPending ? "0" : ">");
    if (ownPending && entries.length === 0) {
      ownPending = false;
      continue;
    }
    if (entries.length === 0) {
      if (opts.idleExitMs > 0 && Date.now() - idleSince > opts.idleExitMs) break;
      continue;
    }
    idleSince = Date.now();
    for (const entry of entries) {
      if (opts.count > 0 && printed >= opts.count) break;
      try {
        const event = decodeEvent(entry.values[wire.entryField] ?? Buffer.alloc(0), wire.versions);
        process.stdout.write(`${JSON.stringify({ stream_id: entry.id, ...event })}\n`);
        printed += 1;
      } catch (err) {
        if (!(err instanceof DecodeError)) throw err;
        skipped += 1;
        process.stderr.write(`skipping ${stream} entry ${entry.id}: ${err.message}\n`);
      }
      await redis.xack(stream, opts.group, entry.id);
    }
  }
  process.stderr.write(`${printed} events printed, ${skipped} entries skipped\n`);
  await redis.quit();
}

main().catch((err) => {
  process.stderr.write(`error: ${err.message}\n`);
  process.exit(2);
});
