//! Compiles the etcd v3 protos (written for this project) with protox: no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "src/proto";
    let files = [
        "etcdserverpb/rpc.proto",
        "mvccpb/kv.proto",
        "authpb/auth.proto",
        "quorumkvpb/internal.proto",
        "v3lockpb/v3lock.proto",
        "v3electionpb/v3election.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={root}/{file}");
    }
    let fds = protox::compile(files, [root])?;
    // JSON for the gateway (/v3/...): proto3 JSON as etcd's grpc-gateway writes it (original
    // field names, 64-bit integers as strings, bytes as base64).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    pbjson_build::Builder::new()
        .register_descriptors(&prost::Message::encode_to_vec(&fds))?
        .preserve_proto_field_names()
        .out_dir(&out_dir)
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
