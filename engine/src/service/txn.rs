//! The `Txn` service: for now the timestamp oracle's front door (`meta::tso`); the
//! transaction calls join it later. Only the meta-range leader hands out timestamps; other
//! nodes answer `NOT_LEADER` with its address.

use std::sync::Arc;

use spheredb_client::proto::v1::txn_server::Txn;
use spheredb_client::proto::v1::{GetTimestampsRequest, GetTimestampsResponse};
use spheredb_client::ClientError;
use spheredb_raft::network::ReplicaDirectory;
use tonic::{Request, Response, Status};

use crate::errors::not_leader_hint;
use crate::meta::tso::Tso;
use crate::peers::Peers;
use crate::replica::leading_meta;

pub struct TxnService {
    replicas: Arc<ReplicaDirectory>,
    peers: Arc<Peers>,
    tso: Arc<Tso>,
}

impl TxnService {
    pub fn new(replicas: Arc<ReplicaDirectory>, peers: Arc<Peers>, tso: Arc<Tso>) -> TxnService {
        TxnService {
            replicas,
            peers,
            tso,
        }
    }
}

#[tonic::async_trait]
impl Txn for TxnService {
    async fn get_timestamps(
        &self,
        request: Request<GetTimestampsRequest>,
    ) -> Result<Response<GetTimestampsResponse>, Status> {
        let count = request.into_inner().count;
        let result = async {
            let meta = leading_meta(&self.replicas)
                .ok_or_else(|| not_leader_hint(self.peers.meta_leader_hint()))?;
            let first = self.tso.timestamps(&meta, count).await?;
            Ok::<_, ClientError>(GetTimestampsResponse { first, count })
        }
        .await;
        result.map(Response::new).map_err(|e| e.to_status())
    }
}
