//! Generates the Rust side of the master–worker contract from `kiln.proto` at build time, with a
//! vendored `protoc` so a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["kiln.proto"], &["."])?;
    println!("cargo:rerun-if-changed=kiln.proto");
    Ok(())
}
