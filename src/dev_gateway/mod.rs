//! A stand-in for EMQX's ExProto gateway, for development and tests.
