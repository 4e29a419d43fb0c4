//! Access logs (HCM `access_log`): `envoy.access_loggers.file` and `.stdout`/`.stderr`
//! with Envoy's default format, `text_format`, `text_format_source` and `json_format`
//! command operators. The request path only captures values; a background thread
//! formats and writes them, and reopens files on SIGUSR1 for log rotation.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::accesslog::v3::{access_log::ConfigType, AccessLog};
use envoy_types::pb::envoy::config::core::v3::{
    substitution_format_string::Format as SfFormat, SubstitutionFormatString,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    file_access_log::AccessLogFormat, FileAccessLog,
};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    stderr_access_log, stdout_access_log, StderrAccessLog, StdoutAccessLog,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use serde_json::Value as Json;

use crate::config::error::{index, join, Errors};
use crate::config::load::{type_name, unpack_any};
use crate::reject_set;
use crate::route::entry::read_data_source;

/// Envoy's default access log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

#[derive(Debug, Clone)]
enum Op {
    StartTime,
    Req(Vec<String>, Option<usize>),
    Resp(Vec<String>, Option<usize>),
    ResponseCode,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    Protocol,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    RouteName,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Op(Op),
}

#[derive(Debug, Clone)]
enum Template {
    Text(Vec<Part>),
    Json(Vec<(String, JsonTemplate)>),
}

#[derive(Debug, Clone)]
enum JsonTemplate {
    Format(Vec<Part>),
    Object(Vec<(String, JsonTemplate)>),
    Literal(Json),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Sink {
    File(String),
    Stdout,
    Stderr,
}

/// One configured logger.
#[derive(Debug, Clone)]
pub struct Logger {
    sink: Sink,
    template: Arc<Template>,
}

/// What a request leaves behind for its access log line.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub start: Option<SystemTime>,
    pub request_headers: http::HeaderMap,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub response_headers: http::HeaderMap,
    pub status: u16,
    pub flags: &'static str,
    pub bytes_received: usize,
    pub bytes_sent: usize,
    pub duration: Duration,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub route_name: String,
    pub protocol: &'static str,
}

/// A `%REQ(a?b):len%` operator's header names and length limit.
type HeaderArgs = (Vec<String>, Option<usize>);

fn parse_op(op: &str) -> Result<Op, String> {
    let with_args = |prefix: &str| -> Option<Result<HeaderArgs, String>> {
        let rest = op.strip_prefix(prefix)?;
        let (inner, tail) = rest.split_once(')')?;
        let len = match tail.strip_prefix(':') {
            Some(n) => match n.parse() {
                Ok(n) => Some(n),
                Err(_) => return Some(Err(format!("bad length in %{op}%"))),
            },
            None if tail.is_empty() => None,
            None => return Some(Err(format!("unexpected '{tail}' in %{op}%"))),
        };
        let names = inner.split('?').map(|h| h.to_ascii_lowercase()).collect();
        Some(Ok((names, len)))
    };
    if let Some(r) = with_args("REQ(") {
        let (names, len) = r?;
        return Ok(Op::Req(names, len));
    }
    if let Some(r) = with_args("RESP(") {
        let (names, len) = r?;
        return Ok(Op::Resp(names, len));
    }
    Ok(match op {
        "START_TIME" => Op::StartTime,
        "RESPONSE_CODE" => Op::ResponseCode,
        "RESPONSE_FLAGS" => Op::ResponseFlags,
        "BYTES_RECEIVED" => Op::BytesReceived,
        "BYTES_SENT" => Op::BytesSent,
        "DURATION" => Op::Duration,
        "UPSTREAM_HOST" => Op::UpstreamHost,
        "UPSTREAM_CLUSTER" => Op::UpstreamCluster,
        "PROTOCOL" => Op::Protocol,
        "DOWNSTREAM_REMOTE_ADDRESS" => Op::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Op::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_LOCAL_ADDRESS" => Op::DownstreamLocalAddress,
        "ROUTE_NAME" => Op::RouteName,
        _ => return Err(format!("command operator %{op}% is not supported")),
    })
}

fn parse_format(s: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            text.push('%');
            rest = r;
            continue;
        }
        let Some(end) = rest.find('%') else {
            return Err(format!("unterminated command operator in '{s}'"));
        };
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(Part::Op(parse_op(&rest[..end])?));
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

fn json_template(s: &Struct, at: &str, errs: &mut Errors) -> Vec<(String, JsonTemplate)> {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    keys.into_iter()
        .filter_map(|k| {
            let v = &s.fields[k];
            let t = match &v.kind {
                Some(Kind::StringValue(f)) => match parse_format(f) {
                    Ok(p) => JsonTemplate::Format(p),
                    Err(e) => {
                        errs.add(join(at, k), e);
                        return None;
                    }
                },
                Some(Kind::StructValue(inner)) => {
                    JsonTemplate::Object(json_template(inner, &join(at, k), errs))
                }
                // Protobuf's JSON mapping prints whole numbers without a fraction, as Envoy does.
                Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                    JsonTemplate::Literal(serde_json::json!(*n as i64))
                }
                Some(Kind::NumberValue(n)) => JsonTemplate::Literal(serde_json::json!(n)),
                Some(Kind::BoolValue(b)) => JsonTemplate::Literal(Json::Bool(*b)),
                _ => JsonTemplate::Literal(Json::Null),
            };
            Some((k.clone(), t))
        })
        .collect()
}

fn substitution(f: &SubstitutionFormatString, at: &str, errs: &mut Errors) -> Option<Template> {
    let SubstitutionFormatString {
        omit_empty_values,
        content_type,
        formatters,
        json_format_options,
        format,
    } = f;
    reject_set!(
        errs,
        at,
        omit_empty_values,
        content_type,
        formatters,
        json_format_options
    );
    match format {
        Some(SfFormat::TextFormat(t)) => text_template(t, &join(at, "text_format"), errs),
        Some(SfFormat::TextFormatSource(src)) => {
            let bytes = read_data_source(src, &join(at, "text_format_source"), errs)?;
            text_template(
                &String::from_utf8_lossy(&bytes),
                &join(at, "text_format_source"),
                errs,
            )
        }
        Some(SfFormat::JsonFormat(s)) => Some(Template::Json(json_template(
            s,
            &join(at, "json_format"),
            errs,
        ))),
        None => Some(Template::Text(
            parse_format(DEFAULT_FORMAT).unwrap_or_default(),
        )),
    }
}

fn text_template(s: &str, at: &str, errs: &mut Errors) -> Option<Template> {
    match parse_format(s) {
        Ok(p) => Some(Template::Text(p)),
        Err(e) => {
            errs.add(at, e);
            None
        }
    }
}

const FILE_TYPE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Converts an HCM's `access_log` list.
pub fn convert(list: &[AccessLog], at: &str, errs: &mut Errors) -> Vec<Logger> {
    let mut out = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let at = index(at, i);
        let AccessLog {
            name: _,
            filter,
            config_type,
        } = a;
        reject_set!(errs, &at, filter);
        let Some(ConfigType::TypedConfig(any)) = config_type else {
            errs.add(join(&at, "typed_config"), "required");
            continue;
        };
        let tat = join(&at, "typed_config");
        let type_name = type_name(any);
        let default = || {
            Some(Template::Text(
                parse_format(DEFAULT_FORMAT).unwrap_or_default(),
            ))
        };
        let logger = match &*type_name {
            FILE_TYPE => match unpack_any::<FileAccessLog>(any, FILE_TYPE, &at) {
                Ok(FileAccessLog {
                    path,
                    access_log_format,
                }) => {
                    if path.is_empty() {
                        errs.add(join(&tat, "path"), "required");
                        continue;
                    }
                    let template = match access_log_format {
                        None => default(),
                        Some(AccessLogFormat::Format(f)) => {
                            text_template(&f, &join(&tat, "format"), errs)
                        }
                        Some(AccessLogFormat::JsonFormat(s)) => Some(Template::Json(
                            json_template(&s, &join(&tat, "json_format"), errs),
                        )),
                        Some(AccessLogFormat::LogFormat(f)) => {
                            substitution(&f, &join(&tat, "log_format"), errs)
                        }
                        Some(AccessLogFormat::TypedJsonFormat(_)) => {
                            errs.add(join(&tat, "typed_json_format"), "not supported");
                            None
                        }
                    };
                    let sink = match path.as_str() {
                        "/dev/stdout" => Sink::Stdout,
                        "/dev/stderr" => Sink::Stderr,
                        p => Sink::File(p.to_string()),
                    };
                    template.map(|t| (sink, t))
                }
                Err(e) => {
                    errs.extend(e);
                    None
                }
            },
            STDOUT_TYPE => match unpack_any::<StdoutAccessLog>(any, STDOUT_TYPE, &at) {
                Ok(StdoutAccessLog { access_log_format }) => {
                    let t = match access_log_format {
                        None => default(),
                        Some(stdout_access_log::AccessLogFormat::LogFormat(f)) => {
                            substitution(&f, &join(&tat, "log_format"), errs)
                        }
                    };
                    t.map(|t| (Sink::Stdout, t))
                }
                Err(e) => {
                    errs.extend(e);
                    None
                }
            },
            STDERR_TYPE => match unpack_any::<StderrAccessLog>(any, STDERR_TYPE, &at) {
                Ok(StderrAccessLog { access_log_format }) => {
                    let t = match access_log_format {
                        None => default(),
                        Some(stderr_access_log::AccessLogFormat::LogFormat(f)) => {
                            substitution(&f, &join(&tat, "log_format"), errs)
                        }
                    };
                    t.map(|t| (Sink::Stderr, t))
                }
                Err(e) => {
                    errs.extend(e);
                    None
                }
            },
            other => {
                errs.unsupported_extension(
                    &tat,
                    other,
                    format!("access logger {other} is not supported"),
                );
                None
            }
        };
        if let Some((sink, template)) = logger {
            out.push(Logger {
                sink,
                template: Arc::new(template),
            });
        }
    }
    out
}

fn header<'a>(
    h: &'a http::HeaderMap,
    names: &[String],
    r: &'a Record,
    request: bool,
) -> Option<String> {
    for n in names {
        let v = match (request, n.as_str()) {
            // Empty only for a head that could not be read (`-`, as Envoy logs it).
            (true, ":method") => Some(r.method.clone()).filter(|m| !m.is_empty()),
            (true, ":path") => Some(r.path.clone()).filter(|_| !r.method.is_empty()),
            (true, ":authority") | (true, "host") => {
                Some(r.authority.clone()).filter(|_| !r.method.is_empty())
            }
            _ => h
                .get(n.as_str())
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        };
        if v.is_some() {
            return v;
        }
    }
    None
}

fn truncate(s: String, len: Option<usize>) -> String {
    match len {
        Some(n) if s.len() > n => s.chars().take(n).collect(),
        _ => s,
    }
}

fn value(op: &Op, r: &Record) -> Option<String> {
    Some(match op {
        Op::StartTime => crate::admin::rfc3339_millis(r.start?),
        Op::Req(names, len) => truncate(header(&r.request_headers, names, r, true)?, *len),
        Op::Resp(names, len) => truncate(header(&r.response_headers, names, r, false)?, *len),
        Op::ResponseCode => r.status.to_string(),
        Op::ResponseFlags => r.flags.to_string(),
        Op::BytesReceived => r.bytes_received.to_string(),
        Op::BytesSent => r.bytes_sent.to_string(),
        Op::Duration => r.duration.as_millis().to_string(),
        Op::UpstreamHost => r.upstream_host?.to_string(),
        Op::UpstreamCluster => r.upstream_cluster.clone()?,
        Op::Protocol => r.protocol.to_string(),
        Op::DownstreamRemoteAddress => r.remote?.to_string(),
        Op::DownstreamRemoteAddressWithoutPort => r.remote?.ip().to_string(),
        Op::DownstreamLocalAddress => r.local?.to_string(),
        Op::RouteName => Some(r.route_name.clone()).filter(|n| !n.is_empty())?,
    })
}

fn render_text(parts: &[Part], r: &Record) -> String {
    let mut out = String::new();
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::Op(op) => out.push_str(&value(op, r).unwrap_or_else(|| "-".into())),
        }
    }
    out
}

/// In JSON, a lone numeric operator stays a number, as Envoy writes it.
fn render_json(fields: &[(String, JsonTemplate)], r: &Record) -> Json {
    let mut map = serde_json::Map::new();
    for (k, t) in fields {
        let v = match t {
            JsonTemplate::Literal(v) => v.clone(),
            JsonTemplate::Object(inner) => render_json(inner, r),
            JsonTemplate::Format(parts) => match parts.as_slice() {
                [Part::Op(
                    op @ (Op::ResponseCode | Op::BytesReceived | Op::BytesSent | Op::Duration),
                )] => value(op, r)
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or(Json::Null, Json::from),
                [Part::Op(op)] => value(op, r).map_or(Json::Null, Json::String),
                _ => Json::String(render_text(parts, r)),
            },
        };
        map.insert(k.clone(), v);
    }
    Json::Object(map)
}

fn render(t: &Template, r: &Record) -> String {
    match t {
        Template::Text(parts) => render_text(parts, r),
        Template::Json(fields) => render_json(fields, r).to_string() + "\n",
    }
}

enum Message {
    /// One request's record, for each of its HCM's loggers.
    Lines(Arc<[Logger]>, Box<Record>),
    Reopen,
}

fn writer() -> &'static Sender<Message> {
    // mpsc::Sender is Sync, so request threads send without a lock.
    static TX: OnceLock<Sender<Message>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = channel();
        let _ = std::thread::Builder::new()
            .name("legate-access-log".into())
            .spawn(move || write_loop(rx));
        tx
    })
}

/// Hands a finished request's record to every logger, off the request path.
pub fn log(loggers: &Arc<[Logger]>, record: Record) {
    let _ = writer().send(Message::Lines(loggers.clone(), Box::new(record)));
}

/// Reopens every log file (SIGUSR1, after rotation).
pub fn reopen() {
    let _ = writer().send(Message::Reopen);
}

fn write_loop(rx: Receiver<Message>) {
    let mut files: HashMap<String, std::io::BufWriter<std::fs::File>> = HashMap::new();
    let open = |p: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(std::io::BufWriter::new)
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Message::Reopen => {
                    for f in files.values_mut() {
                        let _ = f.flush();
                    }
                    files.clear();
                }
                Message::Lines(loggers, record) => {
                    for logger in loggers.iter() {
                        let line = render(&logger.template, &record);
                        match &logger.sink {
                            Sink::Stdout => {
                                let _ = std::io::stdout().write_all(line.as_bytes());
                            }
                            Sink::Stderr => {
                                let _ = std::io::stderr().write_all(line.as_bytes());
                            }
                            Sink::File(p) => {
                                if !files.contains_key(p) {
                                    match open(p) {
                                        Ok(f) => {
                                            files.insert(p.clone(), f);
                                        }
                                        Err(e) => log::error!("access log {p}: {e}"),
                                    }
                                }
                                if let Some(f) = files.get_mut(p) {
                                    let _ = f.write_all(line.as_bytes());
                                }
                            }
                        }
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        // The queue is empty: write out what is buffered.
        for f in files.values_mut() {
            let _ = f.flush();
        }
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let mut h = http::HeaderMap::new();
        h.insert("user-agent", http::HeaderValue::from_static("curl/8"));
        h.insert("x-request-id", http::HeaderValue::from_static("rid"));
        Record {
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_123)),
            request_headers: h,
            method: "GET".into(),
            path: "/a?b".into(),
            authority: "example.com".into(),
            status: 200,
            flags: "-",
            bytes_sent: 42,
            duration: Duration::from_millis(7),
            upstream_host: Some("127.0.0.1:8080".parse().unwrap()),
            protocol: "HTTP/1.1",
            ..Default::default()
        }
    }

    #[test]
    fn default_format_matches_envoy() {
        let t = Template::Text(parse_format(DEFAULT_FORMAT).unwrap());
        assert_eq!(
            render(&t, &record()),
            "[2027-01-15T08:00:00.123Z] \"GET /a?b HTTP/1.1\" 200 - 0 42 7 - \"-\" \"curl/8\" \"rid\" \"example.com\" \"127.0.0.1:8080\"\n"
        );
    }

    #[test]
    fn json_keeps_numbers_numeric() {
        let t = Template::Json(vec![
            (
                "code".into(),
                JsonTemplate::Format(parse_format("%RESPONSE_CODE%").unwrap()),
            ),
            (
                "ua".into(),
                JsonTemplate::Format(parse_format("%REQ(USER-AGENT)%").unwrap()),
            ),
            (
                "missing".into(),
                JsonTemplate::Format(parse_format("%UPSTREAM_CLUSTER%").unwrap()),
            ),
        ]);
        let v: Json = serde_json::from_str(&render(&t, &record())).unwrap();
        assert_eq!(v["code"], 200);
        assert_eq!(v["ua"], "curl/8");
        assert_eq!(v["missing"], Json::Null);
    }

    #[test]
    fn unknown_operators_and_length_limits() {
        assert!(parse_format("%NOPE%").is_err());
        let t = Template::Text(parse_format("%REQ(X-REQUEST-ID):2%").unwrap());
        assert_eq!(render(&t, &record()), "ri");
    }
}
