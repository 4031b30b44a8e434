//! End-to-end tests of the replay input: files in, records and summaries out.
