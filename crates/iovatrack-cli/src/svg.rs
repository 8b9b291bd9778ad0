//! `plan --svg`: the address space as a picture.
//!
//! The axis is piecewise: every boundary of a section or range starts a segment whose width
//! grows with the log of its size, and a stretch no section covers (a hole) is drawn as a
//! short broken-axis gap labelled with its size. A 1 TiB hole then costs as much paper as a
//! 1 MiB one, and a 4 KiB ROM is still visible beside 14 GiB of RAM.

use iovatrack::layout::{Layout, SectionKind};
use iovatrack::plan::report::{DeviceResult, PlanReport};
use iovatrack::range::{human_bytes, IovaRange};
use std::fmt::Write;

const WIDTH: f64 = 1400.0;
const LEFT: f64 = 150.0;
const RIGHT: f64 = 80.0;
const ROW_H: f64 = 26.0;
const HOLE_W: f64 = 22.0;
/// Beyond this many segments, neighbours of one kind are drawn as one.
const MAX_SEGMENTS: usize = 4000;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(kind: SectionKind, readonly: bool) -> &'static str {
    match kind {
        SectionKind::Ram if readonly => "#9aa5b1",
        SectionKind::Ram => "#3c9d5d",
        SectionKind::RamDevice => "#e08a2e",
        SectionKind::Rom => "#9aa5b1",
        SectionKind::Romd => "#b48ead",
        SectionKind::Io => "#d8dee9",
        SectionKind::Iommu => "#bf616a",
    }
}

/// A drawable section run: [start, end) with its kind.
struct Run {
    start: u128,
    end: u128,
    kind: SectionKind,
    readonly: bool,
    label: String,
    count: usize,
}

fn runs(layout: &Layout) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let coalesce = layout.sections().len() > MAX_SEGMENTS / 2;
    for s in layout.sections() {
        if coalesce {
            if let Some(l) = out.last_mut() {
                if l.end == s.start as u128 && l.kind == s.kind && l.readonly == s.readonly {
                    l.end = s.end();
                    l.count += 1;
                    continue;
                }
            }
        }
        out.push(Run {
            start: s.start as u128,
            end: s.end(),
            kind: s.kind,
            readonly: s.readonly,
            label: s.name.clone(),
            count: 1,
        });
    }
    out
}

/// The piecewise axis.
struct Axis {
    /// (address, x) at every boundary, ascending.
    stops: Vec<(u128, f64)>,
    holes: Vec<(u128, u128, f64, f64)>,
}

/// How much an address label at a boundary is worth when labels collide.
fn label_rank(axis: &Axis, secs: &[Run], a: u128) -> u8 {
    let hole_starts = axis.holes.iter().any(|h| h.0 == a);
    let hole_ends = axis.holes.iter().any(|h| h.1 == a);
    let section_starts = secs.binary_search_by(|r| r.start.cmp(&a)).is_ok_and(|i| {
        matches!(
            secs[i].kind,
            SectionKind::Ram | SectionKind::RamDevice | SectionKind::Rom
        )
    });
    match (hole_ends, section_starts, hole_starts) {
        // Where memory resumes after a hole (RAM above 4 GiB, at 1 TiB, ...): the address
        // a reader looks for.
        (true, _, _) => 3,
        (_, true, _) => 2,
        // The start of a hole is the end of what precedes it; a label there, rotated to
        // the right, reads as if it belonged to what follows the (narrow) hole.
        (_, _, true) => 0,
        _ => 1,
    }
}

/// Boundaries to label: the most telling ones first, then others where they fit, never
/// two closer than `gap` pixels. Returned in address order.
fn label_stops(axis: &Axis, secs: &[Run], gap: f64) -> Vec<(u128, f64)> {
    let mut order: Vec<(u8, usize)> = axis
        .stops
        .iter()
        .enumerate()
        .map(|(i, &(a, _))| (label_rank(axis, secs, a), i))
        .collect();
    // Higher rank first; within a rank, left to right.
    order.sort_by_key(|&(rank, i)| (std::cmp::Reverse(rank), i));
    let mut placed: Vec<usize> = Vec::new();
    for (rank, i) in order {
        let x = axis.stops[i].1;
        if rank == 0 && i + 1 < axis.stops.len() {
            // A hole start gets a label only if the hole is wide enough to hold one.
            if axis.stops[i + 1].1 - x < gap {
                continue;
            }
        }
        if placed.iter().all(|&j| (axis.stops[j].1 - x).abs() >= gap) {
            placed.push(i);
        }
    }
    placed.sort_unstable();
    placed.into_iter().map(|i| axis.stops[i]).collect()
}

impl Axis {
    fn new(secs: &[Run], extra: &[(u128, u128)]) -> Axis {
        let mut b: Vec<u128> = secs
            .iter()
            .flat_map(|r| [r.start, r.end])
            .chain(extra.iter().flat_map(|r| [r.0, r.1]))
            .collect();
        b.sort_unstable();
        b.dedup();
        let covering = |a: u128, z: u128| {
            let i = secs.partition_point(|r| r.end <= a);
            (i < secs.len() && secs[i].start < z).then(|| &secs[i])
        };
        let covered = |a: u128, z: u128| covering(a, z).is_some();
        let mut widths = Vec::with_capacity(b.len());
        for w in b.windows(2) {
            let (a, z) = (w[0], w[1]);
            let pages = ((z - a) as f64 / 4096.0).max(1.0);
            let w = 3.0 + 6.0 * (pages + 1.0).log2();
            // MMIO matters less to this picture than memory: half the width.
            widths.push(match covering(a, z) {
                None => HOLE_W,
                Some(r) if matches!(r.kind, SectionKind::Io | SectionKind::Romd) => w / 2.0,
                Some(_) => w,
            });
        }
        let total: f64 = widths.iter().sum::<f64>().max(1.0);
        let scale = (WIDTH - LEFT - RIGHT) / total;
        let mut stops = Vec::with_capacity(b.len());
        let mut holes = Vec::new();
        let mut x = LEFT;
        for (i, a) in b.iter().enumerate() {
            stops.push((*a, x));
            if let Some(w) = widths.get(i) {
                if (*w - HOLE_W).abs() < f64::EPSILON && !covered(*a, b[i + 1]) {
                    holes.push((*a, b[i + 1], x, x + w * scale));
                }
                x += w * scale;
            }
        }
        Axis { stops, holes }
    }

    fn x(&self, addr: u128) -> f64 {
        match self.stops.binary_search_by(|s| s.0.cmp(&addr)) {
            Ok(i) => self.stops[i].1,
            Err(0) => LEFT,
            Err(i) if i >= self.stops.len() => WIDTH - RIGHT,
            Err(i) => {
                let (a0, x0) = self.stops[i - 1];
                let (a1, x1) = self.stops[i];
                x0 + (x1 - x0) * ((addr - a0) as f64 / (a1 - a0) as f64)
            }
        }
    }
}

/// `(fill, stroke)` colours.
type Paint<'a> = (&'a str, &'a str);

fn rect(
    out: &mut String,
    (x0, x1): (f64, f64),
    y: f64,
    h: f64,
    (fill, stroke): Paint<'_>,
    tip: &str,
) {
    let _ = writeln!(
        out,
        r#"<rect x="{x0:.2}" y="{y:.1}" width="{:.2}" height="{h:.1}" fill="{fill}" stroke="{stroke}" stroke-width="0.6"><title>{}</title></rect>"#,
        (x1 - x0).max(1.2),
        esc(tip)
    );
}

fn range_tip(r: &IovaRange) -> String {
    format!(
        "{:#x} – {:#x}  ({})",
        r.iova,
        r.last().unwrap_or(r.iova),
        human_bytes(r.length as u128)
    )
}

/// Sorted ranges as drawable spans: neighbours less than a pixel apart become one span
/// (131,072 virtio-mem blocks would otherwise be 131,072 invisible rectangles).
fn pixels(axis: &Axis, ranges: &[IovaRange], what: &str) -> Vec<((f64, f64), String)> {
    let mut out: Vec<((f64, f64), String, usize)> = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let (x0, x1) = (axis.x(r.iova as u128), axis.x(r.end()));
        match out.last_mut() {
            Some(l)
                if x0 - l.0 .1 < 1.0 && (l.0 .1 - l.0 .0) < 1.0
                    || x0 - l.0 .1 < 0.25 && l.2 > 1 =>
            {
                l.0 .1 = x1;
                l.2 += 1;
                l.1 = format!("{what}: ranges {}..={i} drawn as one", i + 1 - l.2);
            }
            _ => out.push(((x0, x1), format!("{what} range {i}: {}", range_tip(r)), 1)),
        }
    }
    out.into_iter().map(|(x, t, _)| (x, t)).collect()
}

/// Render the layout, the DMA-able set, every strategy's ranges and, when the report has a
/// device, what the device tracks after its driver's merge.
pub fn render(layout: &Layout, report: &PlanReport) -> String {
    let (plan, compare, source) = (&report.plan, &report.compared, report.source.as_str());
    let tracked: Option<&[IovaRange]> = report.device.as_ref().and_then(|d| match &d.result {
        DeviceResult::Accepted { tracked_ranges, .. } => Some(tracked_ranges.as_slice()),
        DeviceResult::Refused { .. } => None,
    });
    let secs = runs(layout);
    let mut extra: Vec<(u128, u128)> = plan.dma.iter().map(|r| (r.iova as u128, r.end())).collect();
    for p in compare.iter().chain(std::iter::once(plan)) {
        extra.extend(p.ranges.iter().map(|r| (r.iova as u128, r.end())));
    }
    extra.extend(
        tracked
            .unwrap_or_default()
            .iter()
            .map(|r| (r.iova as u128, r.end())),
    );
    let axis = Axis::new(&secs, &extra);
    let rows = 2 + compare.len() + usize::from(report.device.is_some());
    let top = 78.0;
    let height = top + rows as f64 * (ROW_H + 12.0) + 150.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{} — address space {:?}</text>"#,
        esc(source),
        esc(layout.address_space())
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="44" fill="#444">{} sections · DMA-able {} · {} plan: {} range(s), tracked {} (overhead {}) · page {}</text>"##,
        layout.sections().len(),
        human_bytes(plan.dma_bytes),
        plan.strategy.as_str(),
        plan.ranges.len(),
        human_bytes(plan.tracked_bytes),
        human_bytes(plan.overhead_bytes()),
        human_bytes(plan.page_size as u128)
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="62" fill="#777" font-size="11">Widths grow with log(size); hatched gaps are holes no section covers. Hover for details.</text>"##
    );
    let _ = writeln!(
        s,
        r##"<defs><pattern id="hole" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#c0c0c0" stroke-width="2"/></pattern></defs>"##
    );
    let mut y = top;
    let label = |s: &mut String, y: f64, text: &str, bold: bool| {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end"{}>{}</text>"#,
            LEFT - 10.0,
            y + ROW_H / 2.0 + 4.0,
            if bold { r#" font-weight="bold""# } else { "" },
            esc(text)
        );
    };
    let bottom = top + rows as f64 * (ROW_H + 12.0) - 12.0;
    for (a, z, x0, x1) in axis.holes.iter().filter(|h| h.3 - h.2 >= 1.0) {
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.2}" y="{top:.1}" width="{:.2}" height="{:.1}" fill="url(#hole)" opacity="0.7"><title>hole {:#x} – {:#x} ({})</title></rect>"##,
            x1 - x0,
            bottom - top,
            a,
            z - 1,
            human_bytes(z - a)
        );
        if z - a >= 1 << 30 {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#666" text-anchor="middle">{}</text>"##,
                (x0 + x1) / 2.0,
                bottom + 14.0,
                esc(&human_bytes(z - a))
            );
        }
    }
    label(&mut s, y, "sections", true);
    // Sub-pixel neighbours of one colour are drawn as one rectangle.
    let mut pending: Option<((f64, f64), &'static str, String)> = None;
    for r in &secs {
        let (x0, x1) = (axis.x(r.start), axis.x(r.end));
        let fill = color(r.kind, r.readonly);
        if let Some(p) = pending.as_mut() {
            if p.1 == fill && x0 - p.0 .1 < 0.5 && (p.0 .1 - p.0 .0 < 1.0 || x1 - x0 < 1.0) {
                p.0 .1 = x1;
                p.2 = format!("{} sections of kind {} drawn as one", r.kind, r.kind);
                continue;
            }
        }
        if let Some((x, fill, tip)) = pending.take() {
            rect(&mut s, x, y, ROW_H, (fill, "#ffffff"), &tip);
        }
        let more = if r.count > 1 {
            format!(" (+{} more)", r.count - 1)
        } else {
            String::new()
        };
        let ro = if r.readonly && r.kind != SectionKind::Rom {
            ", readonly"
        } else {
            ""
        };
        let tip = format!(
            "{}{more} [{}{ro}] {:#x} – {:#x} ({})",
            r.label,
            r.kind,
            r.start,
            r.end - 1,
            human_bytes(r.end - r.start)
        );
        pending = Some(((x0, x1), fill, tip));
    }
    if let Some((x, fill, tip)) = pending {
        rect(&mut s, x, y, ROW_H, (fill, "#ffffff"), &tip);
    }
    y += ROW_H + 12.0;
    label(&mut s, y, "DMA-able", true);
    for (x, tip) in pixels(&axis, &plan.dma, "DMA-able") {
        rect(&mut s, x, y, ROW_H, ("#1f7a3d", "#ffffff"), &tip);
    }
    for p in compare {
        y += ROW_H + 12.0;
        let sel = p.strategy == plan.strategy;
        label(
            &mut s,
            y - 6.0,
            &format!("{} ({})", p.strategy.as_str(), p.ranges.len()),
            sel,
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="#555">tracked {}</text>"##,
            LEFT - 10.0,
            y + ROW_H / 2.0 + 12.0,
            esc(&human_bytes(p.tracked_bytes))
        );
        let fill = if sel { "#2b6cb0" } else { "#90b4de" };
        let n = p.ranges.len().max(1) as f64;
        if p.overlapping {
            // Overlapping ranges (QEMU's buckets) are drawn thinner, stacked.
            for (i, r) in p.ranges.iter().enumerate() {
                let (yy, hh) = (y + i as f64 * ROW_H / n, ROW_H / n);
                let tip = format!("{} range {i}: {}", p.strategy.as_str(), range_tip(r));
                rect(
                    &mut s,
                    (axis.x(r.iova as u128), axis.x(r.end())),
                    yy,
                    hh,
                    (fill, "#1a365d"),
                    &tip,
                );
            }
        } else {
            for (x, tip) in pixels(&axis, &p.ranges, p.strategy.as_str()) {
                rect(&mut s, x, y, ROW_H, (fill, "#1a365d"), &tip);
            }
        }
    }
    if let Some(d) = &report.device {
        y += ROW_H + 12.0;
        match &d.result {
            DeviceResult::Accepted {
                tracked_ranges,
                tracked_bytes,
                merged,
                ..
            } => {
                let what = if *merged { "device (merged)" } else { "device" };
                label(
                    &mut s,
                    y - 6.0,
                    &format!("{what} ({})", tracked_ranges.len()),
                    true,
                );
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="#555">tracked {}</text>"##,
                    LEFT - 10.0,
                    y + ROW_H / 2.0 + 12.0,
                    esc(&human_bytes(*tracked_bytes))
                );
                for (x, tip) in pixels(&axis, tracked_ranges, &d.name) {
                    rect(&mut s, x, y, ROW_H, ("#805ad5", "#44337a"), &tip);
                }
            }
            DeviceResult::Refused { error, .. } => {
                label(&mut s, y, "device", true);
                let _ = writeln!(
                    s,
                    r##"<text x="{LEFT:.1}" y="{:.1}" fill="#b00020">{}: START refused: {}</text>"##,
                    y + ROW_H / 2.0 + 4.0,
                    esc(&d.name),
                    esc(error)
                );
            }
        }
    }
    // Address labels at the telling boundaries, never two closer than 60 px.
    for (a, x) in label_stops(&axis, &secs, 60.0) {
        let _ = writeln!(
            s,
            r##"<text transform="translate({x:.1},{:.1}) rotate(40)" font-size="10" fill="#555">{:#x}</text><line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{:.1}" stroke="#888" stroke-width="0.4" stroke-dasharray="2,2"/>"##,
            bottom + 24.0,
            a,
            bottom + 18.0
        );
    }
    let ly = height - 28.0;
    let mut lx = LEFT;
    for (name, c) in [
        ("ram", "#3c9d5d"),
        ("rom / readonly", "#9aa5b1"),
        ("ram_device", "#e08a2e"),
        ("romd", "#b48ead"),
        ("i/o", "#d8dee9"),
        ("iommu", "#bf616a"),
        ("DMA-able", "#1f7a3d"),
        ("tracked range", "#2b6cb0"),
        ("device-tracked", "#805ad5"),
    ] {
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.1}" y="{:.1}" width="14" height="14" fill="{c}" stroke="#555" stroke-width="0.5"/><text x="{:.1}" y="{:.1}">{name}</text>"##,
            ly - 11.0,
            lx + 18.0,
            ly
        );
        lx += 30.0 + name.len() as f64 * 7.0;
    }
    s.push_str("</svg>\n");
    s
}
