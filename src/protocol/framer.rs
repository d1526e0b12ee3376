//! Splits a byte stream into lines with a hard maximum length.
