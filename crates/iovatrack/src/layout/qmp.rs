//! A live QEMU over QMP: `human-monitor-command` `info mtree -f` on a UNIX socket.
//!
//! QMP messages are one JSON object per line; asynchronous `event` messages may arrive
//! between a command and its `return`, and are skipped.

use super::{mtree, Layout};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long any one QMP reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a live QEMU could not be queried.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened.
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed (timeouts included).
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QMP: QEMU closed the connection before answering {0}")]
    Closed(&'static str),
    /// Not a QMP greeting or reply.
    #[error("QMP: unexpected message while waiting for {expected}: {message}")]
    Unexpected {
        /// What was awaited.
        expected: &'static str,
        /// What came (truncated).
        message: String,
    },
    /// QEMU answered with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: &'static str,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The monitor's text did not parse.
    #[error("QMP info mtree -f: {0}")]
    Mtree(#[from] mtree::MtreeError),
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn read_msg(&mut self, expected: &'static str) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(QmpError::Closed(expected));
            }
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|_| QmpError::Unexpected {
                    expected,
                    message: line.chars().take(200).collect(),
                })?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn execute(
        &mut self,
        command: &'static str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        let msg = serde_json::json!({ "execute": command, "arguments": args });
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        let v = self.read_msg(command)?;
        if let Some(ret) = v.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = v.get("error") {
            let s = |k| {
                err.get(k)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            return Err(QmpError::Command {
                command,
                class: s("class"),
                desc: s("desc"),
            });
        }
        Err(QmpError::Unexpected {
            expected: command,
            message: v.to_string().chars().take(200).collect(),
        })
    }
}

/// The raw `info mtree -f` text of a live QEMU.
pub fn fetch_mtree(path: impl AsRef<Path>) -> Result<String, QmpError> {
    let path = path.as_ref();
    let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let mut q = Qmp {
        reader: BufReader::new(stream.try_clone()?),
        writer: stream,
    };
    let greeting = q.read_msg("the QMP greeting")?;
    if greeting.get("QMP").is_none() {
        return Err(QmpError::Unexpected {
            expected: "the QMP greeting",
            message: greeting.to_string(),
        });
    }
    q.execute("qmp_capabilities", serde_json::json!({}))?;
    let out = q.execute(
        "human-monitor-command",
        serde_json::json!({ "command-line": "info mtree -f" }),
    )?;
    out.as_str()
        .map(str::to_string)
        .ok_or_else(|| QmpError::Unexpected {
            expected: "human-monitor-command",
            message: out.to_string(),
        })
}

/// The flat view serving `address_space` of a live QEMU.
pub fn load(path: impl AsRef<Path>, address_space: &str) -> Result<Layout, QmpError> {
    let text = fetch_mtree(path)?;
    Ok(mtree::parse(&text, address_space)?)
}
