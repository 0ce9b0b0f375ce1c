//! Reflow's contracts between roles: the gRPC services (`.proto` files under this crate,
//! compiled at build time without a system `protoc`) and the snapshot resources they carry.
//!
//! # Layout
//! - [`snapshot::v1`]: generated messages and the `SnapshotService` client and server.
//! - [`resources`]: what a snapshot resource's JSON payload holds, per resource type, and how
//!   resources and whole snapshots are hashed into versions.
//! - [`audit`]: the audit record data planes ship, and what a valid one is.
//! - [`parts`]: updates split into bounded messages and put back together.
//! - [`policy`]: what the policy resources mean: the one decision function the data plane
//!   enforces and the control plane's explain endpoint reports.

pub mod audit;
pub mod parts;
pub mod policy;
pub mod raw;
pub mod resources;

/// Generated code.
pub mod snapshot {
    #[allow(missing_debug_implementations, clippy::all, reason = "generated code")]
    pub mod v1 {
        tonic::include_proto!("reflow.snapshot.v1");
    }
}

/// Generated code of the management API (`reflow/admin/v1/admin.proto`).
pub mod admin {
    #[allow(missing_debug_implementations, clippy::all, reason = "generated code")]
    pub mod v1 {
        tonic::include_proto!("reflow.admin.v1");
    }
}

/// Every message and service of this crate's `.proto` files, as an encoded
/// `FileDescriptorSet`: for gRPC reflection and for reading the management API's options.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reflow_descriptor.bin"));
