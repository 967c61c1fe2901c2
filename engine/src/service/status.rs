//! `spheredb status` and `spheredb range list`: a cluster view assembled from every node's
//! own status and the meta range's range map.

use std::time::Duration;

use serde_json::json;
use spheredb_client::proto::v1::{RangeListResponse, StatusResponse};
use spheredb_client::{Client, ClientOptions};
use spheredb_storage::keys;

/// Time allowed for each node to answer.
pub const NODE_STATUS_TIMEOUT_MS: u64 = 2_000;
/// Most ranges `spheredb status` prints as text; `range list` prints all.
pub const STATUS_TEXT_MAX_RANGES: usize = 40;

/// One node's row in the cluster view.
pub struct NodeRow {
    pub node_id: u64,
    pub addr: String,
    pub status: Result<StatusResponse, String>,
}

/// Asks `host` for the range map, then every node for its own status.
pub async fn gather(host: &str) -> anyhow::Result<(RangeListResponse, Vec<NodeRow>)> {
    let options = ClientOptions {
        call_deadline_ms: NODE_STATUS_TIMEOUT_MS * 2,
        // A handful of calls: one connection per node is plenty.
        connections_per_node: 1,
        ..Default::default()
    };
    let client = Client::connect(&[host], options).await?;
    let list = client.range_list().await?;
    let mut rows = Vec::new();
    for n in &list.nodes {
        let status = tokio::time::timeout(
            Duration::from_millis(NODE_STATUS_TIMEOUT_MS),
            client.status(&n.addr, false),
        )
        .await
        .map_err(|_| "no answer".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        rows.push(NodeRow {
            node_id: n.node_id,
            addr: n.addr.clone(),
            status,
        });
    }
    Ok((list, rows))
}

/// A key for people: `sphere/user-key` for raw KV keys, hex otherwise, `-∞`/`+∞` for empty.
pub fn show_key(k: &[u8]) -> String {
    if let Some((sphere, user)) = keys::decode_kv_key(k) {
        let printable = user.iter().all(|b| b.is_ascii_graphic());
        return if printable {
            format!("kv:{sphere}/{}", String::from_utf8_lossy(user))
        } else {
            format!("kv:{sphere}/0x{}", hex(user))
        };
    }
    if k.is_empty() {
        return "∞".into();
    }
    format!("0x{}", hex(k))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The range map as JSON.
pub fn ranges_json(list: &RangeListResponse) -> serde_json::Value {
    let ranges: Vec<serde_json::Value> = list
        .ranges
        .iter()
        .map(|d| {
            let load = list.loads.iter().find(|l| l.range_id == d.range_id);
            json!({
                "range_id": d.range_id,
                "generation": d.generation,
                "start_key": hex(&d.start_key),
                "end_key": hex(&d.end_key),
                "start": show_key(&d.start_key),
                "end": show_key(&d.end_key),
                "voters": d.voters,
                "learners": d.learners,
                "replicas": d.replicas.iter().map(|r| json!({
                    "replica_id": r.replica_id, "node_id": r.node_id, "voter": r.voter,
                })).collect::<Vec<_>>(),
                "leader_node_id": load.and_then(|l| l.leader_node_id),
                "size_bytes": load.map(|l| l.size_bytes),
                "qps": load.map(|l| l.qps),
            })
        })
        .collect();
    json!({ "meta_leader_node_id": list.leader_id, "ranges": ranges })
}

/// The range map as a table (at most `max` ranges).
fn ranges_table(list: &RangeListResponse, max: usize) -> String {
    let mut out = format!(
        "{:<7} {:<5} {:<24} {:<24} {:<12} {:<7} {:>12} {:>8}\n",
        "RANGE", "GEN", "START", "END", "VOTERS", "LEADER", "SIZE_BYTES", "QPS"
    );
    for d in list.ranges.iter().take(max) {
        let load = list.loads.iter().find(|l| l.range_id == d.range_id);
        let voters: Vec<String> = d.voters.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "{:<7} {:<5} {:<24} {:<24} {:<12} {:<7} {:>12} {:>8}\n",
            d.range_id,
            d.generation,
            if d.start_key.is_empty() {
                "-∞".to_string()
            } else {
                show_key(&d.start_key)
            },
            show_key(&d.end_key),
            voters.join(","),
            load.and_then(|l| l.leader_node_id)
                .map_or("-".into(), |n| n.to_string()),
            load.map_or("-".into(), |l| l.size_bytes.to_string()),
            load.map_or("-".into(), |l| format!("{:.1}", l.qps)),
        ));
    }
    if list.ranges.len() > max {
        out.push_str(&format!(
            "... {} more ranges (spheredb range list shows all)\n",
            list.ranges.len() - max
        ));
    }
    out
}

/// The range map as a table.
pub fn ranges_text(list: &RangeListResponse) -> String {
    ranges_table(list, usize::MAX)
}

/// Renders the cluster view as JSON.
pub fn to_json(list: &RangeListResponse, rows: &[NodeRow]) -> serde_json::Value {
    let cluster_id = rows
        .iter()
        .find_map(|r| r.status.as_ref().ok())
        .map(|s| format!("{:016x}", s.cluster_id));
    let nodes: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let s = r.status.as_ref().ok();
            let replicas = list
                .ranges
                .iter()
                .filter(|d| d.replicas.iter().any(|x| x.node_id == r.node_id))
                .count();
            let leaders = list
                .loads
                .iter()
                .filter(|l| l.leader_node_id == Some(r.node_id))
                .count();
            json!({
                "node_id": r.node_id,
                "addr": r.addr,
                "live": s.is_some(),
                "error": r.status.as_ref().err(),
                "uptime_ms": s.map(|s| s.uptime_ms),
                "replicas": replicas,
                "leaders": leaders,
                "quiesced": s.map(|s| s.ranges.iter().filter(|x| x.quiesced).count()),
                "counters": s.map(|s| s.counters.clone()),
            })
        })
        .collect();
    json!({
        "cluster_id": cluster_id,
        "nodes": nodes,
        "gc_horizon": gc_horizon(rows),
        "range_map": ranges_json(list),
    })
}

/// The oldest timestamp every range can still be read at: the highest GC horizon among the
/// leaders' reports (`None` while no range has collected anything).
fn gc_horizon(rows: &[NodeRow]) -> Option<u64> {
    rows.iter()
        .filter_map(|r| r.status.as_ref().ok())
        .flat_map(|s| s.ranges.iter())
        .filter(|r| r.role == "leader")
        .map(|r| r.gc_horizon)
        .max()
        .filter(|h| *h > 0)
}

/// Renders the cluster view as tables.
pub fn to_text(list: &RangeListResponse, rows: &[NodeRow]) -> String {
    let v = to_json(list, rows);
    let oracle = list
        .leader_id
        .map_or("unknown (no meta-range leader)".to_string(), |id| {
            format!("node {id} (the meta-range leader)")
        });
    let horizon = match gc_horizon(rows) {
        Some(h) => format!(
            "{h} (physical {} ms since the Unix epoch; reads --at an older timestamp answer \
             HISTORY_COMPACTED)",
            h >> 18
        ),
        None => "none yet (every version kept; --gc-ttl sets how long)".to_string(),
    };
    let mut out = format!(
        "cluster {}  ({} ranges)\ntimestamp oracle: {oracle}\nGC horizon: {horizon}\n\n",
        v["cluster_id"].as_str().unwrap_or("?"),
        list.ranges.len()
    );
    out.push_str(&format!(
        "{:<6} {:<22} {:<6} {:>9} {:>8} {:>9}  {}\n",
        "NODE", "ADDRESS", "LIVE", "REPLICAS", "LEADERS", "QUIESCED", "COUNTERS"
    ));
    for n in v["nodes"].as_array().into_iter().flatten() {
        let counters = n["counters"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<6} {:<22} {:<6} {:>9} {:>8} {:>9}  {}\n",
            n["node_id"].to_string(),
            n["addr"].as_str().unwrap_or(""),
            if n["live"].as_bool() == Some(true) {
                "yes"
            } else {
                "NO"
            },
            n["replicas"].to_string(),
            n["leaders"].to_string(),
            n["quiesced"].as_u64().map_or("-".into(), |q| q.to_string()),
            counters,
        ));
    }
    out.push('\n');
    out.push_str(&ranges_table(list, STATUS_TEXT_MAX_RANGES));
    out
}
