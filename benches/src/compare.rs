//! `compare`: SphereDB and etcd over a client sweep, each run on a fresh cluster, the systems
//! of a pair run in alternating order (A B, then B A: ABBA) so that drift of the machine
//! over time favours neither, reported as medians and per-pair ratios (Markdown, JSON, SVG).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::runner::{self, RunConfig, RunResult};
use crate::target::{self, Conn, System};

/// Everything `compare` needs.
pub struct CompareConfig {
    pub base: RunConfig,
    pub client_sweep: Vec<usize>,
    /// Open-loop points: total arrival rates (operations per second), each run with the
    /// largest client count of the sweep as its concurrency limit.
    pub rate_sweep: Vec<f64>,
    pub systems: Vec<System>,
    pub pairs: usize,
    pub spheredb_bin: PathBuf,
    pub etcd_bin: PathBuf,
    pub out_dir: PathBuf,
}

/// Starts a fresh cluster of `system`, preloads it and measures one run.
pub async fn fresh_run(
    system: System,
    cfg: &RunConfig,
    spheredb_bin: &Path,
    etcd_bin: &Path,
) -> anyhow::Result<RunResult> {
    let cluster = if system.is_spheredb() {
        target::start_spheredb(spheredb_bin, 3, system).await?
    } else {
        target::start_etcd(etcd_bin, 3, system).await?
    };
    let mut conn = Conn::connect(&cluster, cfg).await?;
    runner::preload(&mut conn, cfg).await?;
    let mut result = runner::run(system, conn, cfg, &cluster.pids()).await?;
    if system.is_spheredb() {
        result.range_count = target::spheredb_user_ranges(&cluster.endpoints).await.ok();
        if system == System::SpheredbOneRange && result.range_count != Some(1) {
            eprintln!(
                "    warning: spheredb-1range ended with {:?} ranges, not one",
                result.range_count
            );
        }
    }
    drop(cluster);
    Ok(result)
}

/// One point (client count or arrival rate) of one system, medians over its pairs.
#[derive(Serialize)]
struct Row {
    clients: usize,
    /// Open-loop arrival rate; `None` for closed-loop points.
    rate_ops_per_sec: Option<f64>,
    system: System,
    ops_per_sec: f64,
    /// Throughput over etcd's (balanced client) in the same pairs; `None` without etcd.
    ratio_vs_etcd: Option<f64>,
    pair_ratios_vs_etcd: Vec<f64>,
    ratio_vs_etcd_leader: Option<f64>,
    p50_us: u64,
    p99_us: u64,
    /// The most ranges any of the point's runs ended with.
    range_count: Option<usize>,
    server_cpu_seconds: f64,
    server_idle_cpu_seconds: f64,
    server_system_cpu_seconds: f64,
    loadgen_cpu_seconds: f64,
    machine_busy_fraction: f64,
    errors: u64,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The order of `systems` in pair `pair`: as given in even pairs, reversed in odd ones.
pub(crate) fn pair_order<S: Clone>(systems: &[S], pair: usize) -> Vec<S> {
    let mut order = systems.to_vec();
    if pair % 2 == 1 {
        order.reverse();
    }
    order
}

/// A point of the sweep: closed loop with `clients`, or open loop at `rate`.
#[derive(Clone, Copy, PartialEq)]
struct Point {
    clients: usize,
    rate: Option<f64>,
}

fn rows_of(
    points: &[Point],
    systems: &[System],
    results: &[(Point, usize, RunResult)],
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &point in points {
        let of = |s: System| -> Vec<(usize, &RunResult)> {
            results
                .iter()
                .filter(|(p, _, r)| *p == point && r.system == s)
                .map(|(_, pair, r)| (*pair, r))
                .collect()
        };
        for &system in systems {
            let runs = of(system);
            let med = |f: fn(&RunResult) -> f64| median(runs.iter().map(|(_, r)| f(r)).collect());
            let pair_ratios = |base: System| -> Vec<f64> {
                let base_runs = of(base);
                runs.iter()
                    .filter_map(|(pair, r)| {
                        let b = base_runs.iter().find(|(p, _)| p == pair)?.1;
                        (b.ops_per_sec > 0.0).then(|| r.ops_per_sec / b.ops_per_sec)
                    })
                    .collect()
            };
            let ratio = |base: System| {
                let v = pair_ratios(base);
                (systems.contains(&base) && base != system && !v.is_empty()).then(|| median(v))
            };
            let ranges: Vec<usize> = runs.iter().filter_map(|(_, r)| r.range_count).collect();
            rows.push(Row {
                clients: point.clients,
                rate_ops_per_sec: point.rate,
                system,
                ops_per_sec: med(|r| r.ops_per_sec),
                ratio_vs_etcd: ratio(System::Etcd),
                pair_ratios_vs_etcd: if system == System::Etcd {
                    Vec::new()
                } else {
                    pair_ratios(System::Etcd)
                },
                ratio_vs_etcd_leader: ratio(System::EtcdLeader),
                p50_us: med(|r| r.p50_us as f64) as u64,
                p99_us: med(|r| r.p99_us as f64) as u64,
                range_count: ranges.iter().max().copied(),
                server_cpu_seconds: med(|r| r.server_cpu_seconds),
                server_idle_cpu_seconds: med(|r| r.server_idle_cpu_seconds),
                server_system_cpu_seconds: med(|r| r.server_system_cpu_seconds),
                loadgen_cpu_seconds: med(|r| r.loadgen_cpu_seconds),
                machine_busy_fraction: med(|r| r.machine_busy_fraction),
                errors: runs.iter().map(|(_, r)| r.errors).sum(),
            });
        }
    }
    rows
}

/// A median ratio as a table cell ("–" without one).
pub(crate) fn ratio_cell(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_string(), |x| format!("{x:.2}×"))
}

/// Per-pair ratios as a table cell: "0.75, 0.50".
pub(crate) fn pair_ratios_cell(ratios: &[f64]) -> String {
    ratios
        .iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the comparison and writes `compare.md`, `compare.json` and `compare.svg`.
pub async fn run(cfg: CompareConfig) -> anyhow::Result<String> {
    anyhow::ensure!(!cfg.systems.is_empty(), "--systems names no system");
    std::fs::create_dir_all(&cfg.out_dir)?;
    let max_clients = cfg.client_sweep.iter().copied().max().unwrap_or(1);
    let mut points: Vec<Point> = cfg
        .client_sweep
        .iter()
        .map(|&clients| Point {
            clients,
            rate: None,
        })
        .collect();
    points.extend(cfg.rate_sweep.iter().map(|&rate| Point {
        clients: max_clients,
        rate: Some(rate),
    }));
    let total_runs = points.len() * cfg.pairs * cfg.systems.len();
    let mut done = 0;
    let mut results: Vec<(Point, usize, RunResult)> = Vec::new();
    for &point in &points {
        for pair in 0..cfg.pairs {
            for system in pair_order(&cfg.systems, pair) {
                done += 1;
                let mut run_cfg = cfg.base.clone();
                run_cfg.clients = point.clients;
                run_cfg.rate_ops_per_sec = point.rate;
                run_cfg.seed = cfg.base.seed.wrapping_add(pair as u64);
                let shown_rate = point
                    .rate
                    .map_or(String::new(), |r| format!(" rate={r:.0}/s"));
                eprintln!(
                    "[{done}/{total_runs}] {system} clients={}{shown_rate} pair={}",
                    point.clients,
                    pair + 1
                );
                let r = fresh_run(system, &run_cfg, &cfg.spheredb_bin, &cfg.etcd_bin).await?;
                eprintln!(
                    "    {:.0} ops/s  p50 {} us  p99 {} us  errors {}  server {:.1} CPU-s \
                     ({:.1} system, idle {:.1})  load generator {:.1} CPU-s  machine {:.0}% \
                     busy{}",
                    r.ops_per_sec,
                    r.p50_us,
                    r.p99_us,
                    r.errors,
                    r.server_cpu_seconds,
                    r.server_system_cpu_seconds,
                    r.server_idle_cpu_seconds,
                    r.loadgen_cpu_seconds,
                    r.machine_busy_fraction * 100.0,
                    r.range_count
                        .map_or(String::new(), |n| format!("  {n} ranges")),
                );
                results.push((point, pair, r));
            }
        }
    }
    let rows = rows_of(&points, &cfg.systems, &results);

    let base = &cfg.base;
    let mut md = format!(
        "Workload `{:?}`, {} keys ({:?}), {} B values, reads `{:?}`, {} s measured after {} s \
         warm-up, {} pairs per point (order alternating ABBA), 3 nodes each, fresh data dirs \
         per run, {} cores. Medians; ratios are throughput over etcd's in the same pair. \
         Open-loop points (`rate`) measure latency from each operation's intended start \
         (coordinated omission corrected). Server CPU is all threads of the 3 processes over the \
         window (system time in it, and the idle baseline: the servers' CPU over {} ms with \
         no load before the run, scaled to the window). No ops-per-CPU-second figure: on a \
         machine this small the servers' CPU does not track their work (see benches/README.md).\n\n",
        base.workload,
        base.keys,
        base.distribution,
        base.value_size_bytes,
        base.consistency,
        base.duration_secs,
        base.warmup_secs,
        cfg.pairs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        runner::IDLE_BASELINE_MS,
    );
    md.push_str(
        "| clients | rate | system | ops/s | vs etcd | vs etcd-leader | per-pair vs etcd | p50 / p99 ms | ranges | server CPU-s (system, idle) | load gen CPU-s | machine busy |\n",
    );
    md.push_str("|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {:.2} / {:.2} | {} | {:.1} ({:.1}, {:.1}) | {:.1} | {:.0} % |\n",
            r.clients,
            r.rate_ops_per_sec.map_or("closed".to_string(), |x| format!("{x:.0}")),
            r.system,
            r.ops_per_sec,
            ratio_cell(r.ratio_vs_etcd),
            ratio_cell(r.ratio_vs_etcd_leader),
            pair_ratios_cell(&r.pair_ratios_vs_etcd),
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.range_count.map_or("–".to_string(), |n| n.to_string()),
            r.server_cpu_seconds,
            r.server_system_cpu_seconds,
            r.server_idle_cpu_seconds,
            r.loadgen_cpu_seconds,
            r.machine_busy_fraction * 100.0,
        ));
    }
    let errors: u64 = rows.iter().map(|r| r.errors).sum();
    if errors > 0 {
        md.push_str(&format!("\nErrors during measured windows: {errors}.\n"));
    }
    std::fs::write(cfg.out_dir.join("compare.md"), &md)?;
    let runs: Vec<&RunResult> = results.iter().map(|(_, _, r)| r).collect();
    std::fs::write(
        cfg.out_dir.join("compare.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({ "config": base, "rows": rows, "runs": runs }),
        )?,
    )?;
    let closed: Vec<&Row> = rows
        .iter()
        .filter(|r| r.rate_ops_per_sec.is_none())
        .collect();
    plot(
        &cfg.out_dir.join("compare.svg"),
        &closed,
        &cfg.systems,
        &format!("{:?}", base.workload),
    )?;
    Ok(md)
}

/// Picks the value of one panel from a row.
type PanelValue = fn(&Row) -> f64;

fn plot(path: &Path, rows: &[&Row], systems: &[System], workload: &str) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(500);
    let x_of = |r: &Row| (r.clients as f64).log2();
    let x_max = rows.iter().map(|r| x_of(r)).fold(1.0, f64::max);
    let panels: [(&DrawingArea<_, _>, &str, PanelValue); 2] = [
        (&left, "throughput (ops/s)", |r| r.ops_per_sec),
        (&right, "p99 latency (ms)", |r| r.p99_us as f64 / 1000.0),
    ];
    let colors = [BLUE, CYAN, RED, MAGENTA];
    for (area, label, value) in panels {
        let y_max = rows.iter().map(|r| value(r)).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{workload}: {label}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max + 0.2, 0.0..y_max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("clients (log2)")
            .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(*x)))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, &system) in systems.iter().enumerate() {
            let color = colors[i % colors.len()];
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.system == system)
                .map(|r| (x_of(r), value(r)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(system.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn pairs_alternate_their_order() {
        let systems = [System::Spheredb, System::Etcd, System::EtcdLeader];
        assert_eq!(pair_order(&systems, 0), systems.to_vec());
        assert_eq!(
            pair_order(&systems, 1),
            vec![System::EtcdLeader, System::Etcd, System::Spheredb]
        );
    }

    fn result(system: System, ops_per_sec: f64) -> RunResult {
        RunResult {
            system,
            workload: crate::workload::Workload::Kv0,
            clients: 16,
            consistency: crate::target::ReadConsistency::Linearizable,
            ops: ops_per_sec as u64,
            late_ops: 0,
            errors: 0,
            ops_per_sec,
            p50_us: 900,
            p95_us: 1_500,
            p99_us: 2_000,
            p999_us: 3_000,
            server_cpu_seconds: 4.0,
            server_system_cpu_seconds: 2.0,
            server_idle_cpu_seconds: 1.0,
            loadgen_cpu_seconds: 1.0,
            machine_busy_fraction: 0.9,
            range_count: system.is_spheredb().then_some(3),
            measured_secs: 1.0,
        }
    }

    #[test]
    fn ratios_are_per_pair_against_etcd_and_the_svg_is_drawn() {
        let point = Point {
            clients: 16,
            rate: None,
        };
        let systems = [System::Spheredb, System::Etcd, System::EtcdLeader];
        let results = vec![
            (point, 0, result(System::Spheredb, 200.0)),
            (point, 0, result(System::Etcd, 100.0)),
            (point, 0, result(System::EtcdLeader, 400.0)),
            (point, 1, result(System::Spheredb, 300.0)),
            (point, 1, result(System::Etcd, 100.0)),
            (point, 1, result(System::EtcdLeader, 300.0)),
        ];
        let rows = rows_of(&[point], &systems, &results);
        let sphere = &rows[0];
        assert_eq!(sphere.pair_ratios_vs_etcd, vec![2.0, 3.0]);
        assert_eq!(sphere.ratio_vs_etcd, Some(2.5));
        assert_eq!(sphere.ratio_vs_etcd_leader, Some(0.75));
        assert_eq!(sphere.range_count, Some(3));
        assert_eq!(rows[1].ratio_vs_etcd, None, "etcd against itself");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        let refs: Vec<&Row> = rows.iter().collect();
        plot(&path, &refs, &systems, "Kv0").unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("etcd-leader"));
    }
}
