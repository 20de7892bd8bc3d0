"""The web view: a live page for operators (cameras, faces, events, tracks, health, camera admin)."""
