//! `--namespace`: the proxy's clients see one part of the key space as the whole of it. Every
//! key and range of a KV, Watch or Lease request gets the namespace in front before it goes
//! upstream, and every key in an answer loses it. As etcd 3.4's proxy, Lock and Election are
//! not namespaced (their names are keys the member makes; etcd's proxy passes them as they are).

use crate::proto::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseOp, TxnRequest, TxnResponse, WatchCreateRequest, WatchResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::server::prefix_end;

#[derive(Clone, Debug, Default)]
pub struct Namespace(Vec<u8>);

impl Namespace {
    pub fn new(prefix: &str) -> Namespace {
        Namespace(prefix.as_bytes().to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn key(&self, key: &mut Vec<u8>) {
        let mut prefixed = Vec::with_capacity(self.0.len() + key.len());
        prefixed.extend_from_slice(&self.0);
        prefixed.extend_from_slice(key);
        *key = prefixed;
    }

    /// A range's key and end inside the namespace. An end of `\0` (every key from `key` on) ends
    /// where the namespace ends; no end stays no end (one key).
    fn range(&self, key: &mut Vec<u8>, range_end: &mut Vec<u8>) {
        self.key(key);
        if range_end.as_slice() == [0] {
            *range_end = prefix_end(&self.0);
        } else if !range_end.is_empty() {
            self.key(range_end);
        }
    }

    fn strip(&self, key: &mut Vec<u8>) {
        if key.starts_with(&self.0) {
            key.drain(..self.0.len());
        }
    }

    fn strip_kv(&self, kv: &mut Option<KeyValue>) {
        if let Some(kv) = kv {
            self.strip(&mut kv.key);
        }
    }
}

/// A message that carries keys: `enter` puts them in the namespace (a request going upstream),
/// `leave` takes them out of it (an answer coming back).
pub trait Namespaced {
    fn enter(&mut self, _ns: &Namespace) {}
    fn leave(&mut self, _ns: &Namespace) {}
}

impl Namespaced for RangeRequest {
    fn enter(&mut self, ns: &Namespace) {
        ns.range(&mut self.key, &mut self.range_end);
    }
}

impl Namespaced for RangeResponse {
    fn leave(&mut self, ns: &Namespace) {
        for kv in &mut self.kvs {
            ns.strip(&mut kv.key);
        }
    }
}

impl Namespaced for PutRequest {
    fn enter(&mut self, ns: &Namespace) {
        ns.key(&mut self.key);
    }
}

impl Namespaced for PutResponse {
    fn leave(&mut self, ns: &Namespace) {
        ns.strip_kv(&mut self.prev_kv);
    }
}

impl Namespaced for DeleteRangeRequest {
    fn enter(&mut self, ns: &Namespace) {
        ns.range(&mut self.key, &mut self.range_end);
    }
}

impl Namespaced for DeleteRangeResponse {
    fn leave(&mut self, ns: &Namespace) {
        for kv in &mut self.prev_kvs {
            ns.strip(&mut kv.key);
        }
    }
}

impl Namespaced for Compare {
    fn enter(&mut self, ns: &Namespace) {
        ns.range(&mut self.key, &mut self.range_end);
    }
}

impl Namespaced for RequestOp {
    fn enter(&mut self, ns: &Namespace) {
        match &mut self.request {
            Some(request_op::Request::RequestRange(r)) => r.enter(ns),
            Some(request_op::Request::RequestPut(r)) => r.enter(ns),
            Some(request_op::Request::RequestDeleteRange(r)) => r.enter(ns),
            Some(request_op::Request::RequestTxn(r)) => r.enter(ns),
            None => {}
        }
    }
}

impl Namespaced for ResponseOp {
    fn leave(&mut self, ns: &Namespace) {
        match &mut self.response {
            Some(response_op::Response::ResponseRange(r)) => r.leave(ns),
            Some(response_op::Response::ResponsePut(r)) => r.leave(ns),
            Some(response_op::Response::ResponseDeleteRange(r)) => r.leave(ns),
            Some(response_op::Response::ResponseTxn(r)) => r.leave(ns),
            None => {}
        }
    }
}

impl Namespaced for TxnRequest {
    fn enter(&mut self, ns: &Namespace) {
        for c in &mut self.compare {
            c.enter(ns);
        }
        for op in self.success.iter_mut().chain(self.failure.iter_mut()) {
            op.enter(ns);
        }
    }
}

impl Namespaced for TxnResponse {
    fn leave(&mut self, ns: &Namespace) {
        for op in &mut self.responses {
            op.leave(ns);
        }
    }
}

impl Namespaced for WatchCreateRequest {
    fn enter(&mut self, ns: &Namespace) {
        ns.range(&mut self.key, &mut self.range_end);
    }
}

impl Namespaced for WatchResponse {
    fn leave(&mut self, ns: &Namespace) {
        for event in &mut self.events {
            ns.strip_kv(&mut event.kv);
            ns.strip_kv(&mut event.prev_kv);
        }
    }
}

impl Namespaced for LeaseTimeToLiveResponse {
    /// Keys outside the namespace are not the client's: left out, as etcd's proxy does.
    fn leave(&mut self, ns: &Namespace) {
        self.keys.retain(|k| k.starts_with(&ns.0));
        for key in &mut self.keys {
            ns.strip(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ranges_go_into_the_namespace_and_come_out_of_it() {
        let ns = Namespace::new("app/");
        let mut one = RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        };
        one.enter(&ns);
        assert_eq!((one.key, one.range_end), (b"app/a".to_vec(), vec![]));
        let mut all = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        };
        all.enter(&ns);
        assert_eq!(
            (all.key, all.range_end),
            (b"app/\0".to_vec(), b"app0".to_vec())
        );
        let mut prefix = RangeRequest {
            key: b"x".to_vec(),
            range_end: b"y".to_vec(),
            ..Default::default()
        };
        prefix.enter(&ns);
        assert_eq!(
            (prefix.key, prefix.range_end),
            (b"app/x".to_vec(), b"app/y".to_vec())
        );
        let mut txn = TxnRequest {
            compare: vec![Compare {
                key: b"c".to_vec(),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"p".to_vec(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        txn.enter(&ns);
        assert_eq!(txn.compare[0].key, b"app/c".to_vec());
        match &txn.success[0].request {
            Some(request_op::Request::RequestPut(p)) => assert_eq!(p.key, b"app/p".to_vec()),
            other => panic!("{other:?}"),
        }
        let mut answer = RangeResponse {
            kvs: vec![KeyValue {
                key: b"app/a".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        };
        answer.leave(&ns);
        assert_eq!(answer.kvs[0].key, b"a".to_vec());
        let mut ttl = LeaseTimeToLiveResponse {
            keys: vec![b"app/k".to_vec(), b"other/k".to_vec()],
            ..Default::default()
        };
        ttl.leave(&ns);
        assert_eq!(ttl.keys, vec![b"k".to_vec()]);
    }
}
