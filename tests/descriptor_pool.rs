//! The descriptor pool for Envoy's protos (~10 MiB decoded) lives only while a config is
//! read or dumped, not for the life of the gateway.

use std::sync::Arc;

use legate::config::load::pool;

#[test]
fn descriptor_pool_is_shared_while_held_and_freed_after() {
    let held = pool();
    let again = pool();
    assert!(
        Arc::ptr_eq(&held, &again),
        "one decode serves every user at a time"
    );
    let weak = Arc::downgrade(&held);
    drop((held, again));
    assert!(weak.upgrade().is_none(), "nobody holds it, so it is gone");
    // And it comes back when asked for.
    assert!(pool()
        .get_message_by_name("envoy.config.bootstrap.v3.Bootstrap")
        .is_some());
}
