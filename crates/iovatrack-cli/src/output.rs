//! Writing results to standard output.

use std::io::Write;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Exit status when standard output was closed early (`| head`): 128 + SIGPIPE, as a
/// shell reports a process killed by it.
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Write `text` to standard output. `Ok(false)` when the reader went away (EPIPE): not an
/// error worth a message, since `| head` does that on purpose.
pub fn emit(text: &str) -> Result<bool, BoxError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(format!("cannot write to standard output: {e}").into()),
    }
}
