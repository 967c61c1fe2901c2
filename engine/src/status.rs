//! `spheredb status`: a cluster view assembled from every node's own status.

use std::time::Duration;

use serde_json::json;
use spheredb_client::proto::v1::StatusResponse;
use spheredb_client::{Client, ClientOptions};

/// Time allowed for each node to answer.
pub const NODE_STATUS_TIMEOUT_MS: u64 = 2_000;

/// One node's row in the cluster view.
pub struct NodeRow {
    pub node_id: u64,
    pub addr: String,
    pub status: Result<StatusResponse, String>,
}

/// Asks `host` for the member list, then every member for its own status.
pub async fn gather(host: &str) -> anyhow::Result<(StatusResponse, Vec<NodeRow>)> {
    let options = ClientOptions {
        call_deadline_ms: NODE_STATUS_TIMEOUT_MS,
        ..Default::default()
    };
    let client = Client::connect(&[host], options).await?;
    let first = client.status(host, false).await?;
    let mut rows = Vec::new();
    for n in &first.nodes {
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
    Ok((first, rows))
}

/// Renders the cluster view as JSON.
pub fn to_json(first: &StatusResponse, rows: &[NodeRow]) -> serde_json::Value {
    let leader_view = rows
        .iter()
        .filter_map(|r| r.status.as_ref().ok())
        .find(|s| s.ranges.iter().any(|rg| !rg.replicas.is_empty()));
    let range = first.ranges.first();
    json!({
        "cluster_id": format!("{:016x}", first.cluster_id),
        "nodes": rows.iter().map(|r| {
            let range_status = r.status.as_ref().ok().and_then(|s| s.ranges.first());
            let progress = leader_view
                .and_then(|l| l.ranges.first())
                .and_then(|rg| rg.replicas.iter().find(|p| p.node_id == r.node_id));
            json!({
                "node_id": r.node_id,
                "addr": r.addr,
                "live": r.status.is_ok(),
                "error": r.status.as_ref().err(),
                "uptime_ms": r.status.as_ref().ok().map(|s| s.uptime_ms),
                "applied_index": range_status.and_then(|rs| rs.applied_index),
                "last_log_index": range_status.and_then(|rs| rs.last_log_index),
                "matched_index": progress.and_then(|p| p.matched_index),
                "last_ack_ms": progress.and_then(|p| p.last_ack_ms),
            })
        }).collect::<Vec<_>>(),
        "ranges": range.map(|rg| {
            let d = rg.descriptor.clone().unwrap_or_default();
            vec![json!({
                "range_id": d.range_id,
                "generation": d.generation,
                "start_key": hex(&d.start_key),
                "end_key": hex(&d.end_key),
                "voters": d.voters,
                "learners": d.learners,
                "leader_id": rg.leader_id,
                "term": rg.term,
            })]
        }).unwrap_or_default(),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Renders the cluster view as a table.
pub fn to_text(first: &StatusResponse, rows: &[NodeRow]) -> String {
    let v = to_json(first, rows);
    let mut out = format!("cluster {}\n\n", v["cluster_id"].as_str().unwrap_or("?"));
    out.push_str(&format!(
        "{:<6} {:<22} {:<6} {:<8} {:>10} {:>10} {:>10}\n",
        "NODE", "ADDRESS", "LIVE", "ROLE", "APPLIED", "MATCHED", "ACK_MS"
    ));
    let range = v["ranges"].get(0);
    let leader = range.and_then(|r| r["leader_id"].as_u64());
    let voters: Vec<u64> = range
        .and_then(|r| r["voters"].as_array())
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    let opt = |x: &serde_json::Value| x.as_u64().map_or("-".to_string(), |n| n.to_string());
    for n in v["nodes"].as_array().into_iter().flatten() {
        let id = n["node_id"].as_u64().unwrap_or(0);
        let role = if Some(id) == leader {
            "leader"
        } else if voters.contains(&id) {
            "voter"
        } else {
            "learner"
        };
        out.push_str(&format!(
            "{:<6} {:<22} {:<6} {:<8} {:>10} {:>10} {:>10}\n",
            id,
            n["addr"].as_str().unwrap_or(""),
            if n["live"].as_bool() == Some(true) {
                "yes"
            } else {
                "NO"
            },
            role,
            opt(&n["applied_index"]),
            opt(&n["matched_index"]),
            opt(&n["last_ack_ms"]),
        ));
    }
    out.push('\n');
    for r in v["ranges"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "range {} gen {} [{}, {}) voters {} learners {} leader {} term {}\n",
            r["range_id"],
            r["generation"],
            r["start_key"].as_str().unwrap_or(""),
            if r["end_key"].as_str() == Some("") {
                "∞"
            } else {
                r["end_key"].as_str().unwrap_or("")
            },
            r["voters"],
            r["learners"],
            opt(&r["leader_id"]),
            r["term"],
        ));
    }
    out
}
