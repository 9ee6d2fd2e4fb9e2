"""The nbcron monitoring dashboard: Polars frames from the store (`data`), Panel views (`app`)."""
