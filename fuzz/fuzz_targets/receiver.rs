#![no_main]
//! The destination as a network peer sees it: the input is what a peer sends over one or
//! more connections (frames of every kind in any order and size, mostly valid, sometimes
//! corrupted, cut or raw), served by a real `Destination` through an in-memory channel and
//! checked against a model after every connection. See `iovatrack_fuzz::receiver`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iovatrack_fuzz::receiver::run(data));
