//! Membership requests and leader transfer, with etcd's checks. Changes that need the leader's
//! view of the other members' logs (every one that alters the configuration) are decided on
//! the leader: elsewhere they end with `ServerError::NotLeader` and the API forwards them.

use std::time::Duration;

use prost::Message as _;
use raft::eraftpb::ConfChangeType;

use super::error::ServerError;
use super::kv::{KvServer, MemberReply};
use crate::cluster::{learner_ready, MAX_LEARNERS};
use crate::hash::fnv1a;
use crate::proto::etcdserverpb::Member;
use crate::proto::quorumkvpb::{
    raft_request::Request, ConfChangeContext, MemberAttributes, MemberPeerUrls, RaftRequest,
};
use crate::raft::{single_change, NodeError, PeerProgress};

/// How often a leader transfer checks whether the new leader took over.
const TRANSFER_POLL: Duration = Duration::from_millis(20);

fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Peer URLs must be `http://host:port` or `https://host:port`.
pub fn valid_peer_urls(urls: &[String]) -> bool {
    !urls.is_empty()
        && urls.iter().all(|u| {
            url::Url::parse(u).is_ok_and(|p| {
                (p.scheme() == "http" || p.scheme() == "https")
                    && p.host_str().is_some()
                    && p.port().is_some()
                    && p.path() == "/"
            })
        })
}

impl KvServer {
    pub fn member_id(&self) -> u64 {
        self.config().member_id
    }

    /// The membership table, as it changes.
    pub fn members_watch(&self) -> tokio::sync::watch::Receiver<crate::cluster::Members> {
        self.membership.members.clone()
    }

    /// The members as this member has applied them.
    pub fn members(&self) -> Vec<Member> {
        self.membership.members.borrow().list()
    }

    /// The client URLs of the current leader, if known.
    pub fn leader_client_urls(&self) -> Option<(u64, Vec<String>)> {
        let leader = self
            .node()
            .status()
            .leader
            .load(std::sync::atomic::Ordering::Relaxed);
        let members = self.membership.members.borrow();
        let urls = members.get(leader)?.client_ur_ls.clone();
        (!urls.is_empty()).then_some((leader, urls))
    }

    pub async fn member_list(&self, linearizable: bool) -> Result<Vec<Member>, ServerError> {
        if linearizable {
            self.linearizable_barrier().await?;
        }
        Ok(self.members())
    }

    /// The leader's progress of every member; `NotLeader` elsewhere.
    async fn leader_progress(&self) -> Result<Vec<PeerProgress>, ServerError> {
        self.node().progress().await?.ok_or(ServerError::NotLeader)
    }

    /// etcd's strict reconfiguration check for a configuration whose voters will be `voters`:
    /// enough of them must have started (published their name) and be reachable.
    fn check_started(
        &self,
        progress: &[PeerProgress],
        voters: &[u64],
        every_voter_reachable: bool,
    ) -> Result<(), ServerError> {
        if !self.config().strict_reconfig_check {
            return Ok(());
        }
        let members = self.membership.members.borrow();
        let started = voters
            .iter()
            .filter(|id| members.get(**id).is_some_and(|m| !m.name.is_empty()))
            .count();
        // A voter being added has not started yet; it counts as etcd counts it.
        let adding = voters
            .iter()
            .filter(|id| members.get(**id).is_none())
            .count();
        if started + adding < quorum(voters.len()) {
            return Err(ServerError::NotEnoughStartedMembers);
        }
        let reachable = voters
            .iter()
            .filter(|id| progress.iter().any(|p| p.id == **id && p.active))
            .count();
        let existing = voters.len() - adding;
        let needed = if every_voter_reachable {
            existing
        } else {
            quorum(voters.len())
        };
        if reachable < needed {
            return Err(ServerError::Unhealthy);
        }
        Ok(())
    }

    fn voters(progress: &[PeerProgress]) -> Vec<u64> {
        progress
            .iter()
            .filter(|p| !p.learner)
            .map(|p| p.id)
            .collect()
    }

    /// MemberAdd: returns the new member and the members after the change.
    pub async fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<(Member, Vec<Member>), ServerError> {
        if !valid_peer_urls(&peer_urls) {
            return Err(ServerError::BadMemberUrls);
        }
        let progress = self.leader_progress().await?;
        let id = {
            let members = self.membership.members.borrow();
            if members.peer_url_owner(&peer_urls, 0).is_some() {
                return Err(ServerError::PeerUrlExists);
            }
            if is_learner && members.learners() >= MAX_LEARNERS {
                return Err(ServerError::TooManyLearners);
            }
            self.new_member_id(&peer_urls, |id| members.get(id).is_some())
        };
        if !is_learner {
            let mut voters = Self::voters(&progress);
            voters.push(id);
            self.check_started(&progress, &voters, true)?;
        }
        let member = Member {
            id,
            peer_ur_ls: peer_urls,
            is_learner,
            ..Default::default()
        };
        let change_type = if is_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        let members = self
            .change_membership(id, change_type, Some(member.clone()))
            .await?;
        Ok((member, members))
    }

    /// A member id nobody has: from the URLs, the cluster and the request counter.
    fn new_member_id(&self, peer_urls: &[String], taken: impl Fn(u64) -> bool) -> u64 {
        let mut sorted = peer_urls.to_vec();
        sorted.sort();
        loop {
            let salt = self.next_request_id();
            let hash = fnv1a(
                sorted
                    .join(",")
                    .bytes()
                    .chain(self.config().cluster_id.to_le_bytes())
                    .chain(salt.to_le_bytes()),
            );
            if hash != 0 && !taken(hash) {
                return hash;
            }
        }
    }

    fn member(&self, id: u64) -> Result<Member, ServerError> {
        self.membership
            .members
            .borrow()
            .get(id)
            .cloned()
            .ok_or(ServerError::MemberNotFound)
    }

    pub async fn member_remove(&self, id: u64) -> Result<Vec<Member>, ServerError> {
        let progress = self.leader_progress().await?;
        let member = self.member(id)?;
        if !member.is_learner {
            let voters: Vec<u64> = Self::voters(&progress)
                .into_iter()
                .filter(|v| *v != id)
                .collect();
            self.check_started(&progress, &voters, false)?;
        }
        self.change_membership(id, ConfChangeType::RemoveNode, None)
            .await
    }

    pub async fn member_promote(&self, id: u64) -> Result<Vec<Member>, ServerError> {
        let progress = self.leader_progress().await?;
        let member = self.member(id)?;
        if !member.is_learner {
            return Err(ServerError::MemberNotLearner);
        }
        let matched = |who: u64| progress.iter().find(|p| p.id == who).map(|p| p.matched);
        let ready = match (matched(id), matched(self.member_id())) {
            (Some(learner), Some(leader)) => learner_ready(learner, leader),
            _ => false,
        };
        if !ready {
            return Err(ServerError::LearnerNotReady);
        }
        let mut voters = Self::voters(&progress);
        voters.push(id);
        self.check_started(&progress, &voters, false)?;
        self.change_membership(id, ConfChangeType::AddNode, None)
            .await
    }

    /// MemberUpdate: new peer URLs for a member.
    pub async fn member_update(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> Result<Vec<Member>, ServerError> {
        self.leader_progress().await?;
        {
            let members = self.membership.members.borrow();
            // etcd 3.4 looks for the member first; it takes any URLs, where quorumkv refuses
            // ones a peer could not be reached at.
            if members.get(id).is_none() {
                return Err(ServerError::MemberNotFound);
            }
            if !valid_peer_urls(&peer_urls) {
                return Err(ServerError::BadMemberUrls);
            }
            if members.peer_url_owner(&peer_urls, id).is_some() {
                return Err(ServerError::PeerUrlExists);
            }
        }
        self.propose_member_request(Request::MemberPeerUrls(MemberPeerUrls {
            member_id: id,
            peer_urls,
        }))
        .await
    }

    /// Announces this member's name and client URLs (etcd's publish), once it has started.
    pub async fn publish(&self, name: &str, client_urls: &[String]) -> Result<(), ServerError> {
        self.propose_member_request(Request::MemberAttributes(MemberAttributes {
            member_id: self.member_id(),
            name: name.to_string(),
            client_urls: client_urls.to_vec(),
        }))
        .await
        .map(drop)
    }

    /// Has this member's published name and client URLs been applied here?
    pub fn published(&self, name: &str, client_urls: &[String]) -> bool {
        self.membership
            .members
            .borrow()
            .get(self.member_id())
            .is_some_and(|m| m.name == name && m.client_ur_ls == client_urls)
    }

    /// On the leader: promotes every learner that has caught up (`--auto-promote-learners`).
    /// Returns the members promoted.
    pub async fn promote_ready_learners(&self) -> Vec<u64> {
        let learners: Vec<u64> = match self.node().progress().await {
            Ok(Some(progress)) => progress
                .iter()
                .filter(|p| p.learner)
                .map(|p| p.id)
                .collect(),
            _ => return vec![],
        };
        let mut promoted = Vec::new();
        for id in learners {
            match self.member_promote(id).await {
                Ok(_) => {
                    tracing::info!(
                        member = format!("{id:x}"),
                        "promoted a learner that caught up"
                    );
                    promoted.push(id);
                }
                Err(ServerError::LearnerNotReady) => {}
                Err(e) => {
                    tracing::debug!(member = format!("{id:x}"), error = %e, "learner not promoted yet")
                }
            }
        }
        promoted
    }

    /// MoveLeader: on the leader, hands leadership to voter `target` and waits until it leads.
    pub async fn move_leader(&self, target: u64) -> Result<(), ServerError> {
        let progress = self.leader_progress().await?;
        if !progress.iter().any(|p| p.id == target && !p.learner) {
            return Err(ServerError::BadLeaderTransferee);
        }
        if target == self.member_id() {
            return Ok(());
        }
        self.node().transfer_leader(target).await?;
        let status = self.node().status();
        let waited = tokio::time::timeout(self.config().request_timeout, async {
            loop {
                if status.leader.load(std::sync::atomic::Ordering::Relaxed) == target {
                    return;
                }
                tokio::time::sleep(TRANSFER_POLL).await;
            }
        })
        .await;
        waited.map_err(|_| ServerError::LeaderTransferTimeout)
    }

    async fn change_membership(
        &self,
        id: u64,
        change_type: ConfChangeType,
        member: Option<Member>,
    ) -> Result<Vec<Member>, ServerError> {
        let request_id = self.next_request_id();
        let mut change = single_change(id, change_type);
        change.context = ConfChangeContext { request_id, member }
            .encode_to_vec()
            .into();
        self.await_member_request(request_id, self.node().propose_conf_change(change))
            .await
    }

    async fn propose_member_request(&self, request: Request) -> Result<Vec<Member>, ServerError> {
        let request_id = self.next_request_id();
        let data = RaftRequest {
            id: request_id,
            request: Some(request),
            ..Default::default()
        }
        .encode_to_vec();
        self.await_member_request(request_id, self.node().propose(data))
            .await
    }

    /// Waits (up to the request timeout) until the apply loop answers request `request_id`,
    /// proposed by `propose`.
    async fn await_member_request(
        &self,
        request_id: u64,
        propose: impl std::future::Future<
            Output = Result<tokio::sync::oneshot::Receiver<NodeError>, NodeError>,
        >,
    ) -> Result<Vec<Member>, ServerError> {
        let applied = self.membership.waiters.register(request_id);
        let outcome = async {
            let rejected = propose.await?;
            tokio::select! {
                reply = applied => reply.map_err(|_| ServerError::Stopped),
                Ok(e) = rejected => Err(ServerError::Node(e)),
            }
        };
        let result: Result<MemberReply, ServerError> =
            match tokio::time::timeout(self.config().request_timeout, outcome).await {
                Ok(result) => result,
                Err(_) => Err(ServerError::Timeout),
            };
        if result.is_err() {
            self.membership.waiters.take(request_id);
        }
        Ok(result??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_must_be_http_host_and_port() {
        assert!(valid_peer_urls(&["http://127.0.0.1:2380".into()]));
        assert!(!valid_peer_urls(&[]));
        assert!(!valid_peer_urls(&["127.0.0.1:2380".into()]));
        assert!(!valid_peer_urls(&["http://127.0.0.1".into()]));
        assert!(!valid_peer_urls(&["http://127.0.0.1:2380/x".into()]));
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
    }
}
