"""A real RTSP server for the tests (GStreamer's, through Debian's python3-gi).

    /usr/bin/python3 tests/rtsp_server.py PORT MOUNT VIDEO.mp4   # serves an H.264 mp4 as is
    /usr/bin/python3 tests/rtsp_server.py PORT MOUNT --test       # endless synthetic source

Prints "ready" once listening; runs until killed.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    port, mount, source = sys.argv[1], sys.argv[2], sys.argv[3]
    Gst.init(None)
    if source == "--test":
        launch = ("videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=10/1 ! "
                  "x264enc tune=zerolatency speed-preset=ultrafast ! rtph264pay name=pay0 pt=96")
    else:
        launch = (f"filesrc location={source} ! qtdemux ! h264parse config-interval=-1 ! "
                  "rtph264pay name=pay0 pt=96")
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f"( {launch} )")
    factory.set_shared(True)
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        print("cannot bind", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
