use super::*;

fn frames(chunks: &[&[u8]]) -> Body {
    chunks.iter().rev().fold(Body::empty(), |rest, chunk| {
        Body::new(Prefixed {
            head: Some(Bytes::copy_from_slice(chunk)),
            held: None,
            rest: Some(rest),
        })
    })
}

fn framed(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

async fn all_data(mut body: Body) -> (Vec<u8>, Option<HeaderMap>) {
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (data, trailers)
}

#[test]
fn only_the_kv_methods_take_the_short_path() {
    assert_eq!(Method::of("/etcdserverpb.KV/Put"), Some(Method::Put));
    assert_eq!(Method::of("/etcdserverpb.KV/Range"), Some(Method::Range));
    assert_eq!(
        Method::of("/etcdserverpb.KV/DeleteRange"),
        Some(Method::DeleteRange)
    );
    assert_eq!(Method::of("/etcdserverpb.KV/Txn"), Some(Method::Txn));
    assert_eq!(
        Method::of("/etcdserverpb.KV/Compact"),
        Some(Method::Compact)
    );
    assert_eq!(Method::of("/etcdserverpb.KV/Watch"), None);
    assert_eq!(Method::of("/etcdserverpb.Lease/LeaseGrant"), None);
    assert_eq!(Method::of("/v3/kv/put"), None);
}

#[test]
fn only_uncompressed_grpc_requests_take_the_short_path() {
    let mut headers = HeaderMap::new();
    assert!(!takes(&headers), "no content type");
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    assert!(!takes(&headers));
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    assert!(takes(&headers));
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/grpc+proto"),
    );
    assert!(takes(&headers));
    headers.insert("grpc-encoding", HeaderValue::from_static("identity"));
    assert!(takes(&headers));
    headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
    assert!(!takes(&headers));
}

#[tokio::test]
async fn a_message_in_one_frame_or_several_is_read_whole() {
    let message = framed(0, b"hello");
    let Read::Message(read) = read_message(frames(&[&message]), 100).await else {
        panic!("one frame");
    };
    assert_eq!(&read[..], &message[..]);
    let Read::Message(read) =
        read_message(frames(&[&message[..2], &message[2..7], &message[7..]]), 100).await
    else {
        panic!("three frames");
    };
    assert_eq!(&read[..], &message[..]);
}

#[tokio::test]
async fn anything_but_one_plain_message_is_handed_on_unchanged() {
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("compressed", vec![framed(1, b"hello")]),
        ("two messages", vec![framed(0, b"a"), framed(0, b"b")]),
        ("cut short", vec![framed(0, b"hello")[..6].to_vec()]),
        ("shorter than a header", vec![vec![0, 0]]),
        ("empty", vec![]),
    ];
    for (what, chunks) in cases {
        let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let Read::Other { head, held, rest } = read_message(frames(&slices), 100).await else {
            panic!("{what}: taken as a message");
        };
        let passed_on = Body::new(Prefixed {
            head: Some(head),
            held,
            rest: Some(rest),
        });
        assert_eq!(all_data(passed_on).await.0, chunks.concat(), "{what}");
    }
}

#[tokio::test]
async fn a_message_over_the_limit_is_handed_on_with_what_was_not_read() {
    let message = framed(0, &[7; 64]);
    let chunks: Vec<&[u8]> = message.chunks(10).collect();
    let Read::Other { head, held, rest } = read_message(frames(&chunks), 32).await else {
        panic!("taken over the limit");
    };
    assert!(held.is_none());
    assert!(
        head.len() <= 32 + GRPC_HEADER_BYTES + 10,
        "stopped reading at the limit"
    );
    let passed_on = Body::new(Prefixed {
        head: Some(head),
        held,
        rest: Some(rest),
    });
    assert_eq!(all_data(passed_on).await.0, message);
}

#[tokio::test]
async fn an_answer_is_one_message_then_grpc_status_ok() {
    use crate::proto::etcdserverpb::{PutResponse, ResponseHeader};
    let sent = PutResponse {
        header: Some(ResponseHeader {
            revision: 42,
            ..Default::default()
        }),
        prev_kv: None,
    };
    let response = reply::<PutResponse>(Ok(sent.clone()));
    assert_eq!(response.headers()["content-type"], "application/grpc");
    assert_eq!(
        response.headers().len(),
        1,
        "only the content type, as tonic sends"
    );
    assert_eq!(
        response.body().size_hint().exact(),
        None,
        "no content-length"
    );
    let (data, trailers) = all_data(response.into_body()).await;
    assert_eq!(data, framed(0, &sent.encode_to_vec()));
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn an_error_is_a_trailers_only_response_with_etcds_status() {
    use crate::mvcc::MvccError;
    use crate::proto::etcdserverpb::PutResponse;
    let response = reply::<PutResponse>(Err(ServerError::Mvcc(MvccError::Compacted)));
    let status = tonic::Status::from_header_map(response.headers()).unwrap();
    assert_eq!(status.code(), tonic::Code::OutOfRange);
    assert_eq!(
        status.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(all_data(response.into_body()).await.0.is_empty());
}

#[tokio::test]
async fn trailers_in_a_request_are_handed_on_in_their_place() {
    let message = framed(0, b"hello");
    let mut trailers = HeaderMap::new();
    trailers.insert("x-odd", HeaderValue::from_static("1"));
    let body = Body::new(Prefixed {
        head: Some(Bytes::from(message.clone())),
        held: Some(Ok(Frame::trailers(trailers.clone()))),
        rest: Some(frames(&[b"after"])),
    });
    let Read::Other { head, held, rest } = read_message(body, 100).await else {
        panic!("a request with trailers taken as a plain message");
    };
    let passed_on = Body::new(Prefixed {
        head: Some(head),
        held,
        rest: Some(rest),
    });
    let mut passed_on = passed_on;
    let mut seen = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut passed_on).poll_frame(cx)).await
    {
        match frame.unwrap().into_data() {
            Ok(data) => seen.push(format!("data {}", data.len())),
            Err(frame) => seen.push(format!("trailers {:?}", frame.into_trailers().unwrap())),
        }
    }
    assert_eq!(
        seen,
        [
            format!("data {}", message.len()),
            format!("trailers {trailers:?}"),
            "data 5".to_string(),
        ]
    );
}
