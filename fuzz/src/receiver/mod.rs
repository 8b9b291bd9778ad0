//! The `receiver` target: a real [`Destination`] serving the fuzz input as a network
//! peer, session after session, checked against a model of what it must do.
//!
//! Each input gets a new destination (memory, devices, counters), so every finding
//! replays from its input alone. Invariants, each a panic when broken:
//!
//! * `serve_channel` never panics, and returns an error only when a refusal is over the
//!   refusal budget (the destination gives up, as documented);
//! * devices never hold more state than [`DestLimits`] allow (checked as each byte
//!   reaches them), nor a session more vCPU states;
//! * each session ends as the model says (complete and verified, complete and not,
//!   interrupted, refused), with the model's counters: sessions, refusals, memory resets
//!   (a refused peer that wrote pages leaves the memory all zero and a new session id),
//!   pages and duplicates received, the verdict and mismatches;
//! * guest memory equals the model's, page by page, after every session (nothing lands
//!   that the protocol did not accept, nothing accepted is lost);
//! * the devices' restored state and the returned vCPU states are the model's;
//! * once a verified session was committed the guest runs here, and no later session
//!   changes its memory.

mod input;
mod model;
mod peer;

use crate::fixture::{self, DEVICES, GUEST_KIND, PAGE, REGIONS};
use input::Input;
use iovatrack::device::EmulatedDevice;
use iovatrack::migrate::demo::verify::PageHashes;
use iovatrack::migrate::engine::{DestLimits, Destination, MigrateError, Served};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::seams::DeviceMigration;
use model::{Model, Outcome};
use peer::{Meter, Metered, Peer};
use std::sync::{Arc, Mutex};

pub use input::fix_frames;

/// The destination under test and what the target watches of it.
struct Rig {
    memory: Arc<GuestMemory>,
    devices: Vec<Arc<EmulatedDevice>>,
    meter: Arc<Mutex<Meter>>,
    dest: Destination,
    limits: DestLimits,
}

impl Rig {
    fn new() -> Self {
        let limits = fixture::limits();
        let memory = memory();
        let meter = Arc::new(Mutex::new(Meter::default()));
        let mut devices = Vec::new();
        let mut migr: Vec<Box<dyn DeviceMigration>> = Vec::new();
        for (i, name) in DEVICES.iter().enumerate() {
            let (m, d) = Metered::new(name, i, meter.clone(), limits);
            migr.push(Box::new(m));
            devices.push(d);
        }
        let dest = Destination::new(memory.clone(), migr)
            .verifier(Arc::new(PageHashes))
            .vcpu_kind(GUEST_KIND)
            .limits(limits);
        Rig {
            memory,
            devices,
            meter,
            dest,
            limits,
        }
    }
}

/// The guest memory, mapped once per process and zeroed before each input (mapping it
/// per input, or dropping its pages with `MADV_DONTNEED`, cost a third of the run time in
/// page faults). A zeroed page reads and hashes as an untouched one, so no input sees
/// what an earlier one wrote; only whether the verifier hashes a zero page or knows it
/// from `/proc/self/pagemap` differs, which no outcome depends on.
fn memory() -> Arc<GuestMemory> {
    static MEMORY: std::sync::OnceLock<Arc<GuestMemory>> = std::sync::OnceLock::new();
    let memory = MEMORY
        .get_or_init(|| Arc::new(GuestMemory::new(&REGIONS).expect("the fixture's RAM maps")))
        .clone();
    let zero = [0u8; PAGE as usize];
    for &(a, n) in &REGIONS {
        for (p, page) in region_bytes(&memory, a, n)
            .chunks_exact(PAGE as usize)
            .enumerate()
        {
            if page != zero {
                memory
                    .write_page(a + p as u64 * PAGE, &zero)
                    .expect("inside RAM");
            }
        }
    }
    memory
}

/// A region's bytes, to compare with one `memcmp` a page rather than an instrumented
/// loop (the comparison dominated the run time).
fn region_bytes(memory: &GuestMemory, gpa: u64, len: u64) -> &[u8] {
    let words = memory.words(gpa, len).expect("a whole region");
    // SAFETY: the words are the region's live mapping, borrowed from `memory`; no other
    // thread touches guest memory while the target runs, so reading them as plain bytes
    // races with nothing.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len as usize) }
}

/// `RECEIVER_TRACE=1` prints how each session ended (to follow a finding or a seed).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("RECEIVER_TRACE").is_some())
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    let mut rig = Rig::new();
    let mut model = Model::new(rig.limits);
    let mut input = Input::new(data);
    let mut index = 0;
    while let Some((bytes, link)) = input.next_session(index, &model) {
        index += 1;
        let out = Arc::new(Mutex::new(Vec::new()));
        let peer = Peer::new(bytes.clone(), link, out.clone());
        let id_before = rig.dest.session_id();
        let resets_before = rig.dest.report().memory_resets;
        rig.meter.lock().unwrap().session = 0;
        let served = rig.dest.serve_channel(Box::new(peer), "fuzz-peer");
        let want = model.session(&bytes, link);
        let report = rig.dest.report().clone();
        let got = match served {
            Ok(Served::Complete(r)) => {
                assert!(
                    r.vcpu_states.len() <= rig.limits.max_vcpus as usize
                        && r.vcpu_states
                            .iter()
                            .all(|v| v.len() as u64 <= rig.limits.vcpu_state_bytes),
                    "more vCPU state than the limits allow"
                );
                Outcome::Complete {
                    verified: r.report.verified,
                    vcpus: r.vcpu_states,
                }
            }
            Ok(Served::Interrupted(_)) => Outcome::Interrupted,
            Ok(Served::Refused) => Outcome::Refused,
            Err(MigrateError::Destination(why)) if want == Outcome::GaveUp => {
                assert!(why.contains("connections refused"), "{why}");
                Outcome::GaveUp
            }
            Err(e) => panic!("serve_channel failed on a peer's bytes: {e} (model: {want:?})"),
        };
        if trace() {
            eprintln!("session {index}: {} bytes, {link:?}: {got:?}", bytes.len());
        }
        assert_eq!(got, want, "session {index} ended otherwise than the model");
        check(&rig, &model, &report, id_before, resets_before);
        if got == Outcome::GaveUp {
            break;
        }
    }
}

/// The destination's state after a session against the model's.
fn check(
    rig: &Rig,
    model: &Model,
    report: &iovatrack::migrate::engine::DestReport,
    id_before: u64,
    resets_before: u32,
) {
    assert_eq!(report.refused_connections, model.refused, "refusals");
    assert_eq!(report.refusals.len(), model.refused as usize);
    assert_eq!(report.memory_resets, model.resets, "memory resets");
    assert_eq!(report.sessions, model.sessions, "sessions");
    assert_eq!(
        report.pages_received, model.pages_received,
        "pages received"
    );
    assert_eq!(
        report.duplicate_pages_received, model.duplicates,
        "duplicates"
    );
    assert_eq!(report.interrupted.len(), model.interrupted, "interruptions");
    assert_eq!(report.verified, model.verified, "verdict");
    assert_eq!(report.mismatched_pages, model.mismatched, "mismatches");
    assert_eq!(report.devices_restored, model.devices_restored);
    assert_eq!(report.device_state_restored, model.device_state_restored);
    let reset = report.memory_resets > resets_before;
    assert_eq!(
        rig.dest.session_id() != id_before,
        reset,
        "a new session id exactly when the memory was reset"
    );
    assert_eq!(report.session_id, rig.dest.session_id());
    let zero = vec![0u8; PAGE as usize];
    for &(a, n) in &REGIONS {
        let bytes = region_bytes(&rig.memory, a, n);
        for (p, page) in bytes.chunks_exact(PAGE as usize).enumerate() {
            let gpa = a + p as u64 * PAGE;
            let want = model.pages.get(&gpa).unwrap_or(&zero);
            assert!(page == &want[..], "page {gpa:#x} differs from the model's");
        }
    }
    for (d, want) in rig.devices.iter().zip(&model.device_data) {
        assert_eq!(d.migration().data(), &want[..], "device state");
    }
}
