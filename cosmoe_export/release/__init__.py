"""The release gate: measure a bundle (`verify`, `analyze`), judge it (`gates`), report and build."""
