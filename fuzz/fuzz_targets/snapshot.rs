//! Snapshot decoding: any bytes off the wire are decoded and applied, or refused with a reason;
//! never a panic, and an update that applies yields the version it announced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use reflow_proto::snapshot::v1::SnapshotUpdate;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = SnapshotUpdate::decode(data) else { return };
    let sealer = reflow_proto::resources::snapshot_sealer("fuzz-data-plane-token-0123456789");
    if let Ok(snapshot) = reflow_data_plane::snapshot::apply(None, &update, &sealer) {
        assert_eq!(snapshot.version, update.version);
    }
});
