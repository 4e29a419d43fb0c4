//! `envoy.config.core.v3.Http2ProtocolOptions`, on a connection manager (the SETTINGS a
//! downstream HTTP/2 connection advertises) and on a cluster (the windows an upstream
//! connection opens, and how many streams share it). The flow-control and concurrency
//! settings that control planes write are applied; the others are rejected by name.

use envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions;

use super::error::{join, Errors};
use crate::reject_set;

/// An HTTP/2 connection's concurrency and receive windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct H2Settings {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
}

/// Envoy 1.40's defaults, as it advertises them (read off the wire: 1024 streams, a 16 MiB
/// stream window and a 24 MiB connection window).
impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            max_concurrent_streams: 1024,
            initial_stream_window_size: 16 * 1024 * 1024,
            initial_connection_window_size: 24 * 1024 * 1024,
        }
    }
}

/// Envoy's bounds for the window sizes (its proto validation).
const WINDOW_MIN: u32 = 65_535;
const WINDOW_MAX: u32 = 2_147_483_647;

pub fn convert(o: &Http2ProtocolOptions, at: &str, errs: &mut Errors) -> H2Settings {
    let Http2ProtocolOptions {
        hpack_table_size,
        max_concurrent_streams,
        initial_stream_window_size,
        initial_connection_window_size,
        allow_connect,
        allow_metadata,
        max_outbound_frames,
        max_outbound_control_frames,
        max_consecutive_inbound_frames_with_empty_payload,
        max_inbound_priority_frames_per_stream,
        max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging,
        override_stream_error_on_invalid_http_message,
        custom_settings_parameters,
        connection_keepalive,
        max_metadata_size,
        enable_huffman_encoding,
        max_header_field_size_kb,
        disallow_obs_text,
        stream_reset_burst,
        stream_reset_rate,
        use_oghttp2_codec,
    } = o;
    reject_set!(
        errs,
        at,
        hpack_table_size,
        allow_connect,
        allow_metadata,
        max_outbound_frames,
        max_outbound_control_frames,
        max_consecutive_inbound_frames_with_empty_payload,
        max_inbound_priority_frames_per_stream,
        max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging,
        override_stream_error_on_invalid_http_message,
        custom_settings_parameters,
        connection_keepalive,
        max_metadata_size,
        enable_huffman_encoding,
        max_header_field_size_kb,
        disallow_obs_text,
        stream_reset_burst,
        stream_reset_rate,
        use_oghttp2_codec,
    );
    let mut bounded = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>,
                       field: &str,
                       min: u32,
                       max: u32| {
        let v = v.as_ref()?.value;
        if !(min..=max).contains(&v) {
            errs.add(join(at, field), format!("must be in [{min}, {max}]"));
            return None;
        }
        Some(v)
    };
    let d = H2Settings::default();
    H2Settings {
        max_concurrent_streams: bounded(
            max_concurrent_streams,
            "max_concurrent_streams",
            1,
            WINDOW_MAX,
        )
        .unwrap_or(d.max_concurrent_streams),
        initial_stream_window_size: bounded(
            initial_stream_window_size,
            "initial_stream_window_size",
            WINDOW_MIN,
            WINDOW_MAX,
        )
        .unwrap_or(d.initial_stream_window_size),
        initial_connection_window_size: bounded(
            initial_connection_window_size,
            "initial_connection_window_size",
            WINDOW_MIN,
            WINDOW_MAX,
        )
        .unwrap_or(d.initial_connection_window_size),
    }
}
