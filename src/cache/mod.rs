//! The content-addressed cache of stage outputs (Parquet + manifest, checksummed, locked).
