//! The `iovatrack` command.
fn main() {}
