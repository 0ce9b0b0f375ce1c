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
pub mod resources;

/// Generated code.
pub mod snapshot {
    #[allow(missing_debug_implementations, clippy::all, reason = "generated code")]
    pub mod v1 {
        tonic::include_proto!("reflow.snapshot.v1");
    }
}
