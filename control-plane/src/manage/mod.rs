//! Management from code: the gRPC management API ([`grpc`]), served beside the snapshot
//! service, and declarative configuration ([`declare`]) behind its `Apply` and `Dump`.

pub mod declare;
pub mod grpc;
