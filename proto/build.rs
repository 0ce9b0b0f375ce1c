//! Compiles the .proto files with protox (a protobuf compiler written in Rust), so building
//! needs no system `protoc`. The encoded descriptor set is kept too: the control plane serves
//! it for gRPC reflection and reads the management API's `route` options from it (encoded by
//! protox itself, since `prost_types` would drop those extension options).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["reflow/snapshot/v1/snapshot.proto", "reflow/admin/v1/admin.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true).open_files(files)?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("reflow_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
