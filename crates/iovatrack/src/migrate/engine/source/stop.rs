//! Stop-and-copy, verification and the Commit handover.

use super::{expect, AttemptEnd, Conn, Source, Verdict};
use crate::migrate::engine::hooks::{Checkpoint, Control};
use crate::migrate::engine::{AttemptError, Event, Handover, PassStats};
use crate::migrate::wire::Frame;
use std::borrow::Cow;
use std::time::Instant;

impl Source<'_, '_> {
    /// Pause, take the final dirt, send it with the device and vCPU states, and hand the
    /// guest over if the destination verifies.
    pub(super) fn stop_and_copy(
        &mut self,
        c: &mut Conn,
        attempt: u32,
        pass: u32,
        collected: (u64, u64),
        events: &mut dyn FnMut(Event),
    ) -> Result<Verdict, AttemptEnd> {
        let paused_at = Instant::now();
        self.vm
            .vcpus
            .pause()
            .map_err(|e| AttemptEnd::Abort(e.into()))?;
        self.devices_to_stop_copy().map_err(AttemptEnd::Abort)?;
        self.hooks.at(Checkpoint::Collect {
            attempt,
            pass,
            final_pass: true,
        });
        let (read, dev) = self.collect().map_err(AttemptEnd::Abort)?;
        let cpu = read.new;
        self.ledger
            .begin_pass()
            .map_err(|e| AttemptEnd::Abort(e.into()))?;
        let super::pass::Sent {
            pages, bytes, secs, ..
        } = self.send_pass(c, attempt, pass, None, events)?;
        // The last pages are out: the extra streams end here (their pass is complete).
        c.close_streams();
        // Device states: the rest of each data fd's stream (STOP_COPY runs to its end).
        self.send_device_states_inner(c, true)?;
        let vcpus = self
            .vm
            .vcpus
            .save()
            .map_err(|e| AttemptEnd::Abort(e.into()))?;
        for (index, bytes) in vcpus.into_iter().enumerate() {
            c.w.write_frame(&Frame::VcpuState {
                index: index as u32,
                bytes: Cow::Owned(bytes),
            })?;
        }
        c.w.flush()?;
        expect(
            &mut c.r,
            "Ack",
            |f| matches!(f, Frame::Ack { pass: p } if *p == pass),
        )?;
        self.ledger.ack();
        c.acked_bytes = c.bytes();
        self.report.pages_sent += pages;
        self.report.passes += 1;
        let downtime_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        events(Event::Pass(PassStats {
            attempt,
            pass,
            pages,
            bytes,
            secs,
            cpu_dirty: cpu + collected.0,
            device_dirty: dev + collected.1,
            est_downtime_ms: downtime_ms,
            final_pass: true,
        }));
        let verifying = Instant::now();
        let heard = self.verify(c);
        // Also when verification failed: the guest waited that long.
        self.report.verify_ms = verifying.elapsed().as_secs_f64() * 1000.0;
        let heard = heard?;
        let ok = heard.memory_ok && heard.device_state_matched();
        if heard.memory_ok && !heard.device_state_matched() {
            // The memory matched but the devices would resume from other state than
            // theirs: no handover, and the destination hears why.
            c.abort("the device state received differs from what was sent");
        }
        if ok && self.hooks.at(Checkpoint::BeforeCommit { attempt }) == Control::DropLink {
            c.drop_link();
            return Err(AttemptEnd::Retry(AttemptError::DroppedBeforeCommit));
        }
        let handover = if ok {
            // Hand the guest over. Until Commit the destination does not run it, so any
            // failure before this point lets the source resume safely; after a failed
            // Commit nobody can tell, and the guest stays paused here.
            let sent = c.w.write_frame(&Frame::Commit).and_then(|_| c.w.flush());
            if let Err(e) = sent {
                return Err(AttemptEnd::Uncertain(AttemptError::CommitUncertain(e)));
            }
            // A link dropped here loses the ack even if it already sits in the socket's
            // receive queue (Linux still hands that out after shutdown).
            let dropped = self.hooks.at(Checkpoint::AfterCommit { attempt }) == Control::DropLink;
            if dropped {
                c.drop_link();
            }
            // The destination acks once it owns the guest, before resuming it; within
            // the read timeout, or the handover stays unknown.
            let ack = if dropped {
                Err(crate::migrate::wire::WireError::Closed)
            } else {
                c.r.read_frame()
            };
            match ack {
                Ok(Frame::CommitAck) => Handover::Acknowledged,
                Ok(other) => {
                    log::warn!("expected CommitAck, got {:?}", other.kind());
                    Handover::Unacknowledged
                }
                Err(e) => {
                    log::warn!("no CommitAck: {e}");
                    Handover::Unacknowledged
                }
            }
        } else {
            Handover::None
        };
        Ok(Verdict {
            ok,
            handover,
            heard,
            downtime_ms,
        })
    }
}
