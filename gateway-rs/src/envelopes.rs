//! The wire contract (SPEC §6), mirrored from the Python models in
//! `fleetward.api.envelopes` (the source of truth; `schemas/envelopes.schema.json` is
//! generated from them): session events, agent commands, control messages, control acks.
//!
//! Same rules as the Python side: unknown fields are rejected at every level, types are
//! strict (`"5"` is not an integer, `"true"` not a boolean), `data` must fit the payload of
//! the envelope's `type`, and the cross-field rules (edit only with decision "edit", error
//! exactly when a tool call failed, ...) hold. `tests/fixtures.rs` proves the two agree on
//! `schemas/fixtures`. Patterns are checked by small functions rather than a regex engine
//! (each is a character class plus a length, see `wire.py` for the regexes they implement).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

pub const EVENT_SCHEMA: &str = "fleetward.event.v1";
pub const COMMAND_SCHEMA: &str = "fleetward.command.v1";
pub const CONTROL_SCHEMA: &str = "fleetward.control.v1";
pub const CONTROL_ACK_SCHEMA: &str = "fleetward.control-ack.v1";
pub const ALERT_SCHEMA: &str = "fleetward.alert.v1";

/// Longest text (`TEXT_MAX` in wire.py).
pub const TEXT_MAX: usize = 100_000;
const INT64_MAX: u64 = i64::MAX as u64;

/// What is wrong with an envelope or frame: the field (JSON path) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for Invalid {}

pub fn invalid<T>(field: impl Into<String>, problem: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        field: field.into(),
        problem: problem.into(),
    })
}

/// Deserialize with serde; the error names the path inside `field` where it failed.
pub fn from_value<T: DeserializeOwned>(field: &str, v: Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = match (field, path.as_str()) {
            (_, ".") => field.to_string(),
            // Top-level envelopes are named by their own fields ("sessionId", not "event.sessionId").
            ("event" | "command" | "control" | "ack" | "frame", p) => p.to_string(),
            (f, p) => format!("{f}.{p}"),
        };
        Invalid {
            field,
            problem: e.into_inner().to_string(),
        }
    })
}

fn parse_json(bytes: &[u8]) -> Result<Value, Invalid> {
    serde_json::from_slice(bytes).map_err(|e| Invalid {
        field: "$".into(),
        problem: format!("not JSON: {e}"),
    })
}

// -- field rules (wire.py) ------------------------------------------------------------------

fn chars_between(field: &str, s: &str, min: usize, max: usize) -> Result<(), Invalid> {
    let n = s.chars().count();
    if n < min || n > max {
        return invalid(field, format!("must be {min}-{max} characters (got {n})"));
    }
    Ok(())
}

fn is_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// `ID_CHARS`: 1+ of [A-Za-z0-9._:-].
pub fn is_id_chars(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_id_char)
}

/// Session ids (and run ids): 1-128 of [A-Za-z0-9._:-].
pub fn is_session_id(s: &str) -> bool {
    s.len() <= 128 && is_id_chars(s)
}

fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?`: a DNS-1123 label.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && lower_alnum(b[0])
        && lower_alnum(b[b.len() - 1])
        && b.iter().all(|&c| lower_alnum(c) || c == b'-')
}

/// `[a-z](?:[-a-z0-9]{0,50}[a-z0-9])?`: an Agent name (DNS-1035, at most 52 characters).
fn is_agent_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=52).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && lower_alnum(b[b.len() - 1])
        && b.iter().all(|&c| lower_alnum(c) || c == b'-')
}

/// `AGENT_REF`: `<namespace>/<name>`.
pub fn is_agent_ref(s: &str) -> bool {
    s.split_once('/')
        .is_some_and(|(ns, name)| is_dns_label(ns) && is_agent_name(name))
}

/// `TRACE_ID`: 32 lowercase hex digits.
pub fn is_trace_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `UUID_PATTERN`: 8-4-4-4-12 hex digits, either case.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// `TOOL_NAME`: 1-64 of [a-zA-Z0-9_-].
fn is_tool_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `ROUTE_NAME`: [a-z0-9][a-z0-9_.-]*.
fn is_route_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && lower_alnum(b[0]) && b.iter().all(|&c| lower_alnum(c) || matches!(c, b'_' | b'.' | b'-'))
}

/// `KILL_SWITCH_NAME`: dot-separated labels of [a-z0-9-], each starting and ending alphanumeric.
pub fn is_kill_switch_name(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && lower_alnum(b[0])
                && lower_alnum(b[b.len() - 1])
                && b.iter().all(|&c| lower_alnum(c) || c == b'-')
        })
}

/// `RFC3339`: `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)`, and a real date-time.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&n) {
            return false;
        }
        i += 1 + n;
    }
    let zone = &b[i..];
    let zone_ok = zone == b"Z"
        || (zone.len() == 6
            && matches!(zone[0], b'+' | b'-')
            && zone[1..3].iter().all(u8::is_ascii_digit)
            && zone[3] == b':'
            && zone[4..6].iter().all(u8::is_ascii_digit));
    zone_ok && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

fn check_str(field: &str, s: &str, min: usize, max: usize, ok: fn(&str) -> bool, rule: &str) -> Result<(), Invalid> {
    chars_between(field, s, min, max)?;
    if !ok(s) {
        return invalid(field, format!("{s:?} does not match {rule}"));
    }
    Ok(())
}

fn check_id(field: &str, s: &str) -> Result<(), Invalid> {
    check_str(field, s, 1, 128, is_id_chars, "[A-Za-z0-9._:-]")
}

fn check_agent(field: &str, s: &str) -> Result<(), Invalid> {
    check_str(
        field,
        s,
        3,
        116,
        is_agent_ref,
        "<namespace>/<name> (DNS label / DNS-1035 name)",
    )
}

fn check_text(field: &str, s: &str) -> Result<(), Invalid> {
    chars_between(field, s, 1, TEXT_MAX)
}

fn check_reason(field: &str, s: &str) -> Result<(), Invalid> {
    chars_between(field, s, 1, 4096)
}

fn check_identity(field: &str, s: &str) -> Result<(), Invalid> {
    chars_between(field, s, 1, 256)
}

fn check_step(field: &str, s: &str) -> Result<(), Invalid> {
    chars_between(field, s, 1, 128)
}

fn check_tool(field: &str, s: &str) -> Result<(), Invalid> {
    check_str(field, s, 1, 64, is_tool_name, "[a-zA-Z0-9_-]{1,64}")
}

fn check_kill_switch(field: &str, s: &str) -> Result<(), Invalid> {
    check_str(field, s, 1, 253, is_kill_switch_name, "a Kubernetes object name")
}

fn check_count(field: &str, n: u64) -> Result<(), Invalid> {
    if n > INT64_MAX {
        return invalid(field, "must be at most 2^63-1");
    }
    Ok(())
}

fn check_range(field: &str, n: u64, min: u64, max: u64) -> Result<(), Invalid> {
    if n < min || n > max {
        return invalid(field, format!("must be between {min} and {max} (got {n})"));
    }
    Ok(())
}

fn opt<T>(v: &Option<T>, f: impl FnOnce(&T) -> Result<(), Invalid>) -> Result<(), Invalid> {
    v.as_ref().map_or(Ok(()), f)
}

/// Fields every envelope has.
fn check_common(schema: &str, expected: &str, id: &str, timestamp: &str) -> Result<(), Invalid> {
    if schema != expected {
        return invalid("schema", format!("must be {expected:?} (got {schema:?})"));
    }
    if !is_uuid(id) {
        return invalid("id", format!("{id:?} is not a UUID"));
    }
    if !is_rfc3339(timestamp) {
        return invalid(
            "timestamp",
            format!("{timestamp:?} is not an RFC 3339 date-time with an offset"),
        );
    }
    Ok(())
}

// -- event payloads (events.py) -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Message,
    Status,
    ToolCall,
    ToolResult,
    ApprovalRequired,
    ApprovalDecision,
    Escalated,
    Resolved,
    Failed,
    BudgetExceeded,
    Halted,
    Resumed,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Message => "message",
            EventType::Status => "status",
            EventType::ToolCall => "tool_call",
            EventType::ToolResult => "tool_result",
            EventType::ApprovalRequired => "approval_required",
            EventType::ApprovalDecision => "approval_decision",
            EventType::Escalated => "escalated",
            EventType::Resolved => "resolved",
            EventType::Failed => "failed",
            EventType::BudgetExceeded => "budget_exceeded",
            EventType::Halted => "halted",
            EventType::Resumed => "resumed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approve,
    Edit,
    Reject,
}

/// `EDIT_RULES`: `edit` exactly when the decision is "edit".
pub fn check_edit(field: &str, decision: Decision, edit: Option<&str>) -> Result<(), Invalid> {
    match (decision, edit) {
        (Decision::Edit, Some(e)) => check_text(field, e),
        (Decision::Edit, None) => invalid(field, "is required when decision is \"edit\""),
        (_, Some(_)) => invalid(field, "is not allowed when decision is \"approve\" or \"reject\""),
        (_, None) => Ok(()),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageData {
    pub role: MessageRole,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageRole {
    Assistant,
    User,
    System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SessionState {
    Active,
    WaitingForHuman,
    Completed,
    Failed,
    TimedOut,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusData {
    pub state: SessionState,
    #[serde(default)]
    pub step: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolCallData {
    pub tool: String,
    pub call_id: String,
    pub arguments: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolResultData {
    pub tool: String,
    pub call_id: String,
    pub ok: bool,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalKind {
    Draft,
    Tool,
    Step,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalRequiredData {
    pub kind: ApprovalKind,
    #[serde(default)]
    pub review_id: Option<String>,
    #[serde(default)]
    pub draft: Option<String>,
    #[serde(default)]
    pub tool: Option<String>,
    #[serde(default)]
    pub arguments: Option<Map<String, Value>>,
    #[serde(default)]
    pub step: Option<String>,
    pub reason: String,
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalDecisionData {
    pub decision: Decision,
    pub reviewer: String,
    #[serde(default)]
    pub edit: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EscalatedData {
    pub queue: String,
    pub reason: String,
    #[serde(default)]
    pub topic: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifySpec {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub delay_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolvedData {
    pub summary: String,
    #[serde(default)]
    pub verify: Option<VerifySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailedData {
    pub reason: String,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Budget {
    Tokens,
    ToolCalls,
    Steps,
    DailyTokens,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetExceededData {
    pub budget: Budget,
    pub limit: u64,
    pub used: u64,
    #[serde(default)]
    pub partial: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HaltedData {
    pub kill_switch: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub step: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResumedData {
    #[serde(default)]
    pub kill_switch: Option<String>,
}

/// An event's payload, by the event's type.
#[derive(Debug, Clone)]
pub enum EventData {
    Message(MessageData),
    Status(StatusData),
    ToolCall(ToolCallData),
    ToolResult(ToolResultData),
    ApprovalRequired(ApprovalRequiredData),
    ApprovalDecision(ApprovalDecisionData),
    Escalated(EscalatedData),
    Resolved(ResolvedData),
    Failed(FailedData),
    BudgetExceeded(BudgetExceededData),
    Halted(HaltedData),
    Resumed(ResumedData),
}

/// Where an event's `data` is decoded from: a parsed `Value` (the reference path, whose serde
/// errors name the field) or the raw JSON text of `data` in the record (the fast path; its
/// serde errors are never shown, see `SessionEvent::parse`).
trait Payload {
    fn decode<T: DeserializeOwned>(self) -> Result<T, Invalid>;
}

impl Payload for Value {
    fn decode<T: DeserializeOwned>(self) -> Result<T, Invalid> {
        from_value("data", self)
    }
}

impl Payload for &RawValue {
    fn decode<T: DeserializeOwned>(self) -> Result<T, Invalid> {
        serde_json::from_str(self.get()).map_err(|e| Invalid {
            field: "data".into(),
            problem: e.to_string(),
        })
    }
}

impl EventData {
    fn parse(kind: EventType, data: impl Payload) -> Result<EventData, Invalid> {
        let out = match kind {
            EventType::Message => {
                let p: MessageData = data.decode()?;
                check_text("data.text", &p.text)?;
                EventData::Message(p)
            }
            EventType::Status => {
                let p: StatusData = data.decode()?;
                opt(&p.step, |s| check_step("data.step", s))?;
                opt(&p.detail, |s| check_reason("data.detail", s))?;
                EventData::Status(p)
            }
            EventType::ToolCall => {
                let p: ToolCallData = data.decode()?;
                check_tool("data.tool", &p.tool)?;
                check_id("data.callId", &p.call_id)?;
                EventData::ToolCall(p)
            }
            EventType::ToolResult => {
                let p: ToolResultData = data.decode()?;
                check_tool("data.tool", &p.tool)?;
                check_id("data.callId", &p.call_id)?;
                opt(&p.error, |s| check_reason("data.error", s))?;
                opt(&p.duration_ms, |n| check_count("data.durationMs", *n))?;
                match (p.ok, &p.error) {
                    (false, None) => return invalid("data.error", "is required when ok is false"),
                    (true, Some(_)) => {
                        return invalid("data.error", "is not allowed when ok is true");
                    }
                    _ => {}
                }
                EventData::ToolResult(p)
            }
            EventType::ApprovalRequired => {
                let p: ApprovalRequiredData = data.decode()?;
                opt(&p.review_id, |s| check_id("data.reviewId", s))?;
                opt(&p.draft, |s| check_text("data.draft", s))?;
                opt(&p.tool, |s| check_tool("data.tool", s))?;
                opt(&p.step, |s| check_step("data.step", s))?;
                check_reason("data.reason", &p.reason)?;
                check_range("data.timeoutSeconds", p.timeout_seconds, 1, 2_592_000)?;
                let (needed, present) = match p.kind {
                    ApprovalKind::Draft => ("draft", p.draft.is_some()),
                    ApprovalKind::Tool => ("tool", p.tool.is_some()),
                    ApprovalKind::Step => ("step", p.step.is_some()),
                };
                if !present {
                    return invalid(
                        format!("data.{needed}"),
                        format!("is required when kind is \"{needed}\""),
                    );
                }
                EventData::ApprovalRequired(p)
            }
            EventType::ApprovalDecision => {
                let p: ApprovalDecisionData = data.decode()?;
                check_identity("data.reviewer", &p.reviewer)?;
                check_edit("data.edit", p.decision, p.edit.as_deref())?;
                EventData::ApprovalDecision(p)
            }
            EventType::Escalated => {
                let p: EscalatedData = data.decode()?;
                check_str("data.queue", &p.queue, 1, 128, is_route_name, "[a-z0-9][a-z0-9_.-]*")?;
                check_reason("data.reason", &p.reason)?;
                opt(&p.topic, |s| chars_between("data.topic", s, 1, 256))?;
                EventData::Escalated(p)
            }
            EventType::Resolved => {
                let p: ResolvedData = data.decode()?;
                check_text("data.summary", &p.summary)?;
                if let Some(v) = &p.verify {
                    opt(&v.url, |u| {
                        check_str(
                            "data.verify.url",
                            u,
                            1,
                            2048,
                            |u| u.starts_with("http://") || u.starts_with("https://"),
                            "^https?://",
                        )
                    })?;
                    opt(&v.delay_seconds, |n| {
                        check_range("data.verify.delaySeconds", *n, 0, 86_400)
                    })?;
                }
                EventData::Resolved(p)
            }
            EventType::Failed => {
                let p: FailedData = data.decode()?;
                check_reason("data.reason", &p.reason)?;
                opt(&p.error, |s| chars_between("data.error", s, 1, 8192))?;
                EventData::Failed(p)
            }
            EventType::BudgetExceeded => {
                let p: BudgetExceededData = data.decode()?;
                check_count("data.limit", p.limit)?;
                check_count("data.used", p.used)?;
                opt(&p.partial, |s| chars_between("data.partial", s, 0, TEXT_MAX))?;
                EventData::BudgetExceeded(p)
            }
            EventType::Halted => {
                let p: HaltedData = data.decode()?;
                check_kill_switch("data.killSwitch", &p.kill_switch)?;
                opt(&p.reason, |s| check_reason("data.reason", s))?;
                opt(&p.step, |s| check_step("data.step", s))?;
                EventData::Halted(p)
            }
            EventType::Resumed => {
                let p: ResumedData = data.decode()?;
                opt(&p.kill_switch, |s| check_kill_switch("data.killSwitch", s))?;
                EventData::Resumed(p)
            }
        };
        Ok(out)
    }
}

// -- session events -------------------------------------------------------------------------

/// The envelope as it arrives; `D` holds `data` until `type` says what it must be (a `Value`,
/// or in the fast path the raw JSON text of `data`, borrowed from the record).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEvent<D> {
    schema: String,
    id: String,
    #[serde(rename = "type")]
    kind: EventType,
    session_id: String,
    agent: String,
    run_id: String,
    trace_id: String,
    timestamp: String,
    sequence: u64,
    data: D,
}

/// A session event (topic `fleetward.events`, key = sessionId).
#[derive(Debug, Clone)]
pub struct SessionEvent {
    pub id: String,
    pub kind: EventType,
    pub session_id: String,
    pub agent: String,
    pub run_id: String,
    pub trace_id: String,
    pub timestamp: String,
    pub sequence: u64,
    pub data: EventData,
}

impl SessionEvent {
    /// Parse and validate an event from the record's bytes.
    ///
    /// Every consumed event goes through here, so it decodes the bytes straight into the
    /// event (`data` into its payload struct once `type` is known) instead of building a
    /// `Value` tree first. Whatever that fast path refuses is parsed again by `from_json`,
    /// the reference path, which words the error: the fast path is never more lenient than
    /// `from_json` (same serde types and rules; it also refuses what `Value` would let
    /// through, such as a repeated key, where `Value` keeps the last one), so valid events
    /// come out the same, and invalid ones (rare, and not delivered) get exactly the errors
    /// they always had, at twice the parsing cost.
    pub fn parse(bytes: &[u8]) -> Result<SessionEvent, Invalid> {
        match Self::parse_fast(bytes) {
            Some(ev) => Ok(ev),
            None => Self::from_json(parse_json(bytes)?),
        }
    }

    /// The fast path of `parse`: `None` for anything it refuses, whatever the reason.
    fn parse_fast(bytes: &[u8]) -> Option<SessionEvent> {
        let r = serde_json::from_slice::<RawEvent<&RawValue>>(bytes).ok()?;
        Self::validate(r).ok()
    }

    pub fn from_json(v: Value) -> Result<SessionEvent, Invalid> {
        Self::validate(from_value::<RawEvent<Value>>("event", v)?)
    }

    fn validate(r: RawEvent<impl Payload>) -> Result<SessionEvent, Invalid> {
        check_common(&r.schema, EVENT_SCHEMA, &r.id, &r.timestamp)?;
        check_str("sessionId", &r.session_id, 1, 128, is_id_chars, "[A-Za-z0-9._:-]")?;
        check_agent("agent", &r.agent)?;
        check_id("runId", &r.run_id)?;
        if !is_trace_id(&r.trace_id) {
            return invalid("traceId", format!("{:?} is not 32 lowercase hex digits", r.trace_id));
        }
        check_count("sequence", r.sequence)?;
        let data = EventData::parse(r.kind, r.data)?;
        Ok(SessionEvent {
            id: r.id,
            kind: r.kind,
            session_id: r.session_id,
            agent: r.agent,
            run_id: r.run_id,
            trace_id: r.trace_id,
            timestamp: r.timestamp,
            sequence: r.sequence,
            data,
        })
    }

    /// `data.verify` of a `resolved` event.
    pub fn verify_spec(&self) -> Option<&VerifySpec> {
        match &self.data {
            EventData::Resolved(r) => r.verify.as_ref(),
            _ => None,
        }
    }
}

// -- agent commands (commands.py) -----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandType {
    UserMessage,
    Handoff,
    Resume,
    ProvideSop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Reviewer,
    Operator,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "reviewer" => Some(Role::Reviewer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Reviewer => "reviewer",
            Role::Operator => "operator",
        }
    }

    /// Who may send approval decisions (SPEC §5.1).
    pub fn may_decide(self) -> bool {
        matches!(self, Role::Reviewer | Role::Operator)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandUser {
    pub sub: String,
    pub role: Role,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UserMessageData {
    text: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Urgency {
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct QueryAnalysis {
    intent: String,
    #[allow(dead_code)]
    urgency: Urgency,
    tone: String,
    topic: String,
    #[allow(dead_code)]
    is_sensitive: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HandoffData {
    from_agent: String,
    parent_run_id: String,
    text: String,
    topic: String,
    analysis: QueryAnalysis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ResumeData {
    run_id: String,
    decision: Decision,
    #[serde(default)]
    edit: Option<String>,
    reviewer: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProvideSopData {
    run_id: String,
    instructions: String,
    #[serde(default)]
    title: Option<String>,
}

/// An agent command (topic `fleetward.requests.<namespace>.<agent>`, key = sessionId).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentCommand {
    pub schema: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: CommandType,
    pub session_id: String,
    pub agent: String,
    pub idempotency_key: String,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<CommandUser>,
    pub data: Map<String, Value>,
}

impl AgentCommand {
    pub fn parse(bytes: &[u8]) -> Result<AgentCommand, Invalid> {
        Self::from_json(parse_json(bytes)?)
    }

    pub fn from_json(v: Value) -> Result<AgentCommand, Invalid> {
        let c: AgentCommand = from_value("command", v)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        check_common(&self.schema, COMMAND_SCHEMA, &self.id, &self.timestamp)?;
        check_str("sessionId", &self.session_id, 1, 128, is_id_chars, "[A-Za-z0-9._:-]")?;
        check_agent("agent", &self.agent)?;
        check_str(
            "idempotencyKey",
            &self.idempotency_key,
            1,
            256,
            |s| s.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "printable ASCII without spaces",
        )?;
        if let Some(t) = &self.trace_id
            && !is_trace_id(t)
        {
            return invalid("traceId", format!("{t:?} is not 32 lowercase hex digits"));
        }
        opt(&self.user, |u| check_identity("user.sub", &u.sub))?;
        let data = Value::Object(self.data.clone());
        match self.kind {
            CommandType::UserMessage => {
                let d: UserMessageData = from_value("data", data)?;
                check_text("data.text", &d.text)?;
            }
            CommandType::Handoff => {
                let d: HandoffData = from_value("data", data)?;
                check_agent("data.fromAgent", &d.from_agent)?;
                check_id("data.parentRunId", &d.parent_run_id)?;
                check_text("data.text", &d.text)?;
                check_str("data.topic", &d.topic, 1, 128, is_route_name, "[a-z0-9][a-z0-9_.-]*")?;
                chars_between("data.analysis.intent", &d.analysis.intent, 1, 256)?;
                chars_between("data.analysis.tone", &d.analysis.tone, 1, 64)?;
                chars_between("data.analysis.topic", &d.analysis.topic, 1, 256)?;
            }
            CommandType::Resume => {
                let d: ResumeData = from_value("data", data)?;
                check_id("data.runId", &d.run_id)?;
                check_identity("data.reviewer", &d.reviewer)?;
                check_edit("data.edit", d.decision, d.edit.as_deref())?;
            }
            CommandType::ProvideSop => {
                let d: ProvideSopData = from_value("data", data)?;
                check_id("data.runId", &d.run_id)?;
                check_text("data.instructions", &d.instructions)?;
                opt(&d.title, |s| chars_between("data.title", s, 1, 256))?;
            }
        }
        // The cross-field rules of AgentCommand.RULES.
        if self.kind != CommandType::Handoff && self.user.is_none() {
            return invalid(
                "user",
                "is required when type is one of \"user_message\", \"resume\", \"provide_sop\"",
            );
        }
        if self.kind == CommandType::Resume
            && let Some(u) = &self.user
            && !u.role.may_decide()
        {
            return invalid(
                "user.role",
                "must be one of \"reviewer\", \"operator\" when type is \"resume\"",
            );
        }
        Ok(())
    }
}

// -- control and acks (control.py) ----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlType {
    Halt,
    Resume,
    RotateKeys,
}

impl ControlType {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlType::Halt => "halt",
            ControlType::Resume => "resume",
            ControlType::RotateKeys => "rotate_keys",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaltMode {
    Drain,
    Abort,
}

/// A KillSwitch's `spec.scope` as carried by a control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlScope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_selector: Option<AgentSelector>,
}

/// A Kubernetes label selector, with the KillSwitch CRD's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl ControlScope {
    fn check(&self) -> Result<(), Invalid> {
        if let Some(namespaces) = &self.namespaces {
            if namespaces.len() > 256 {
                return invalid("scope.namespaces", "at most 256 entries");
            }
            for (i, ns) in namespaces.iter().enumerate() {
                if !is_dns_label(ns) {
                    return invalid(
                        format!("scope.namespaces[{i}]"),
                        format!("must be a namespace name (a DNS label: lower-case letters, digits, '-'), got {ns:?}"),
                    );
                }
            }
        }
        let Some(expressions) = self.agent_selector.as_ref().and_then(|s| s.match_expressions.as_ref()) else {
            return Ok(());
        };
        if expressions.len() > 32 {
            return invalid("scope.agentSelector.matchExpressions", "at most 32 entries");
        }
        for (i, e) in expressions.iter().enumerate() {
            let field = format!("scope.agentSelector.matchExpressions[{i}]");
            if e.key.is_empty() || e.key.chars().count() > 317 {
                return invalid(format!("{field}.key"), "must have 1 to 317 characters");
            }
            if e.values.as_ref().is_some_and(|v| v.len() > 64) {
                return invalid(format!("{field}.values"), "at most 64 entries");
            }
        }
        Ok(())
    }
}

/// A control message (topic `fleetward.control`). Unlike the other envelopes, fields this
/// version does not know are ignored, not refused: a halt from a newer operator must still
/// stop this gateway's sessions (upgrades roll instances one by one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlMessage {
    pub schema: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ControlType,
    pub kill_switch: String,
    pub generation: u64,
    /// Empty, null or absent: every agent the scope covers by namespace alone (`order_covers`).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub agents: Vec<String>,
    /// The switch's scope as written; informational (coverage is `agents`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ControlScope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<HaltMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_seconds: Option<u64>,
    /// Halt only: when the runtimes' drain must be over (RFC 3339); the gateway does not drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Halt only: tell and close the covered sessions (KillSwitch `actions.closeSessions`;
    /// absent: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_sessions: Option<bool>,
    pub timestamp: String,
}

/// `agents` may be null, as the schema allows for every optional field; it means the same as
/// absent or empty.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

impl ControlMessage {
    pub fn parse(bytes: &[u8]) -> Result<ControlMessage, Invalid> {
        Self::from_json(parse_json(bytes)?)
    }

    pub fn from_json(v: Value) -> Result<ControlMessage, Invalid> {
        let c: ControlMessage = from_value("control", v)?;
        check_common(&c.schema, CONTROL_SCHEMA, &c.id, &c.timestamp)?;
        check_kill_switch("killSwitch", &c.kill_switch)?;
        check_count("generation", c.generation)?;
        if c.agents.len() > 100_000 {
            return invalid("agents", "at most 100000 entries");
        }
        for (i, a) in c.agents.iter().enumerate() {
            check_agent(&format!("agents[{i}]"), a)?;
        }
        opt(&c.scope, ControlScope::check)?;
        opt(&c.drain_timeout_seconds, |n| {
            check_range("drainTimeoutSeconds", *n, 1, 3600)
        })?;
        opt(&c.drain_deadline, |t| {
            if is_rfc3339(t) {
                Ok(())
            } else {
                invalid(
                    "drainDeadline",
                    format!("{t:?} is not an RFC 3339 date-time with an offset"),
                )
            }
        })?;
        opt(&c.reason, |s| check_reason("reason", s))?;
        // `mode` and `drainTimeoutSeconds` may be left out of a halt (the KillSwitch's
        // defaults, drain and 30 s, apply in the runtimes); the gateway uses neither.
        Ok(c)
    }

    /// Whether a halt closes the covered agents' connected sessions.
    pub fn closes_sessions(&self) -> bool {
        self.close_sessions.unwrap_or(true)
    }

    /// Whether this message covers `agent` (`namespace/name`).
    pub fn covers(&self, agent: &str) -> bool {
        order_covers(&self.agents, self.scope.as_ref(), agent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckType {
    Drained,
    Halted,
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Runtime,
    Gateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Drained,
    Aborted,
    Forced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AckRun {
    pub session_id: String,
    pub run_id: String,
    pub step: String,
    pub outcome: RunOutcome,
}

/// Whether an order with these `agents` and `scope` is for `agent` (`namespace/name`). The
/// operator lists the agents it resolved; an empty list means every agent, but only as far
/// as the scope says so without labels: its namespaces are applied here, and an order that
/// narrows by label without listing its agents covers none (an instance cannot see labels;
/// a hand-written `{"agents": [], "scope": {"namespaces": ["a"]}}` halted every agent).
/// The same rule as `ControlMessage.covers` in Python.
pub fn order_covers(agents: &[String], scope: Option<&ControlScope>, agent: &str) -> bool {
    if !agents.is_empty() {
        return agents.iter().any(|a| a == agent);
    }
    let Some(scope) = scope else {
        return true;
    };
    if scope.agent_selector.is_some() {
        return false;
    }
    match &scope.namespaces {
        Some(ns) if !ns.is_empty() => {
            let namespace = agent.split('/').next().unwrap_or_default();
            ns.iter().any(|n| n == namespace)
        }
        _ => true,
    }
}

/// A control ack (topic `fleetward.control-acks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlAck {
    pub schema: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: AckType,
    pub kill_switch: String,
    pub generation: u64,
    /// The reporting instance (SPEC §6: acks carry the instance id).
    #[serde(rename = "instanceId")]
    pub instance: String,
    pub component: Component,
    pub agents: Vec<String>,
    pub counts: BTreeMap<String, u64>,
    pub runs: Vec<AckRun>,
    pub timestamp: String,
}

impl ControlAck {
    pub fn parse(bytes: &[u8]) -> Result<ControlAck, Invalid> {
        Self::from_json(parse_json(bytes)?)
    }

    pub fn from_json(v: Value) -> Result<ControlAck, Invalid> {
        let a: ControlAck = from_value("ack", v)?;
        check_common(&a.schema, CONTROL_ACK_SCHEMA, &a.id, &a.timestamp)?;
        check_kill_switch("killSwitch", &a.kill_switch)?;
        check_count("generation", a.generation)?;
        check_str("instanceId", &a.instance, 1, 253, is_id_chars, "[A-Za-z0-9._:-]")?;
        for (i, ag) in a.agents.iter().enumerate() {
            check_agent(&format!("agents[{i}]"), ag)?;
        }
        if a.counts.len() > 64 {
            return invalid("counts", "at most 64 counters");
        }
        for (name, n) in &a.counts {
            let b = name.as_bytes();
            let ok =
                (1..=64).contains(&b.len()) && b[0].is_ascii_lowercase() && b.iter().all(u8::is_ascii_alphanumeric);
            if !ok {
                return invalid(format!("counts.{name}"), "a counter name is [a-z][A-Za-z0-9]{0,63}");
            }
            check_count(&format!("counts.{name}"), *n)?;
        }
        for (i, r) in a.runs.iter().enumerate() {
            check_str(
                &format!("runs[{i}].sessionId"),
                &r.session_id,
                1,
                128,
                is_id_chars,
                "[A-Za-z0-9._:-]",
            )?;
            check_id(&format!("runs[{i}].runId"), &r.run_id)?;
            check_step(&format!("runs[{i}].step"), &r.step)?;
        }
        Ok(a)
    }
}

/// Any envelope, chosen by its `schema` field (like `parse_envelope` in Python).
#[derive(Debug, Clone)]
pub enum Envelope {
    Event(Box<SessionEvent>),
    Command(Box<AgentCommand>),
    Control(Box<ControlMessage>),
    Ack(Box<ControlAck>),
}

pub fn parse_envelope(bytes: &[u8]) -> Result<Envelope, Invalid> {
    let v = parse_json(bytes)?;
    let schema = v
        .as_object()
        .and_then(|o| o.get("schema"))
        .and_then(Value::as_str)
        .map(str::to_string);
    match schema.as_deref() {
        Some(EVENT_SCHEMA) => Ok(Envelope::Event(Box::new(SessionEvent::from_json(v)?))),
        Some(COMMAND_SCHEMA) => Ok(Envelope::Command(Box::new(AgentCommand::from_json(v)?))),
        Some(CONTROL_SCHEMA) => Ok(Envelope::Control(Box::new(ControlMessage::from_json(v)?))),
        Some(CONTROL_ACK_SCHEMA) => Ok(Envelope::Ack(Box::new(ControlAck::from_json(v)?))),
        _ => invalid(
            "schema",
            format!("must be one of {EVENT_SCHEMA}, {COMMAND_SCHEMA}, {CONTROL_SCHEMA}, {CONTROL_ACK_SCHEMA}"),
        ),
    }
}

/// Valid sample envelopes for tests across the crate.
#[cfg(test)]
pub mod samples {
    use serde_json::{Value, json};

    /// A valid payload for each event type.
    pub fn data_for(kind: &str) -> Value {
        match kind {
            "message" => json!({"role": "assistant", "text": "hello"}),
            "status" => json!({"state": "Active"}),
            "tool_call" => json!({"tool": "lookup", "callId": "c1", "arguments": {}}),
            "tool_result" => json!({"tool": "lookup", "callId": "c1", "ok": true}),
            "approval_required" => {
                json!({"kind": "draft", "draft": "refund 10 EUR", "reason": "policy", "timeoutSeconds": 600})
            }
            "approval_decision" => json!({"decision": "approve", "reviewer": "rita"}),
            "escalated" => json!({"queue": "billing-humans", "reason": "unsure"}),
            "resolved" => json!({"summary": "done"}),
            "failed" => json!({"reason": "boom"}),
            "budget_exceeded" => json!({"budget": "tokens", "limit": 10, "used": 11}),
            "halted" => json!({"killSwitch": "stop-all"}),
            "resumed" => json!({}),
            _ => json!({}),
        }
    }

    pub fn event_json(kind: &str, session: &str, run: &str, agent: &str) -> Value {
        json!({
            "schema": super::EVENT_SCHEMA, "id": uuid::Uuid::new_v4().to_string(), "type": kind,
            "sessionId": session, "agent": agent, "runId": run,
            "traceId": "0af7651916cd43dd8448eb211c80319c", "timestamp": "2026-01-02T03:04:05Z",
            "sequence": 0, "data": data_for(kind)
        })
    }

    pub fn event(kind: &str, session: &str, run: &str, agent: &str) -> super::SessionEvent {
        super::SessionEvent::from_json(event_json(kind, session, run, agent)).expect("valid sample event")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patterns() {
        assert!(is_agent_ref("githouse/billing") && is_agent_ref("a/b"));
        assert!(!is_agent_ref("githouse/9lives"), "agent names start with a letter");
        assert!(!is_agent_ref("Githouse/billing") && !is_agent_ref("githouse") && !is_agent_ref("a/b/c"));
        assert!(!is_agent_ref(&format!("ns/{}", "a".repeat(53))));
        assert!(is_rfc3339("2025-06-02T09:00:18Z") && is_rfc3339("2025-06-02T09:00:18.123456789+01:00"));
        for bad in [
            "2025-06-02T09:00:18",
            "2025-06-02 09:00:18Z",
            "2025-06-02t09:00:18z",
            "2025-13-02T09:00:18Z",
            "2025-06-02T09:00:18.Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
        assert!(is_uuid("0b6f2d3e-5c1a-4e8b-9f7d-00000000000A"));
        assert!(!is_uuid("0b6f2d3e5c1a4e8b9f7d00000000000a"));
        assert!(is_kill_switch_name("stop-billing") && is_kill_switch_name("a.b-c"));
        assert!(!is_kill_switch_name("Stop") && !is_kill_switch_name("a..b") && !is_kill_switch_name("-a"));
        assert!(is_trace_id("00000000000000000000000000000000"));
    }

    /// `SessionEvent::parse` against the reference (`from_json` on a `Value`): the same event
    /// or exactly the same error. Compared through `Debug`, which shows every field.
    fn same_as_reference(bytes: &[u8]) -> Result<SessionEvent, Invalid> {
        let got = SessionEvent::parse(bytes);
        let reference = parse_json(bytes).and_then(SessionEvent::from_json);
        assert_eq!(
            format!("{got:?}"),
            format!("{reference:?}"),
            "{}",
            String::from_utf8_lossy(bytes)
        );
        got
    }

    fn fixture_events(kind: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas/fixtures")
            .join(kind);
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), p))
            .filter(|(name, _)| name.starts_with("event_"))
            .map(|(name, p)| (name, std::fs::read(p).unwrap()))
            .collect();
        out.sort();
        assert!(!out.is_empty(), "no event fixtures in {}", dir.display());
        out
    }

    #[test]
    fn one_pass_parse_takes_every_valid_fixture_and_agrees_with_the_reference() {
        for (name, bytes) in fixture_events("valid") {
            assert!(
                SessionEvent::parse_fast(&bytes).is_some(),
                "{name}: not taken by the fast path"
            );
            same_as_reference(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn one_pass_parse_refuses_every_invalid_fixture_with_the_reference_error() {
        for (name, bytes) in fixture_events("invalid") {
            assert!(
                SessionEvent::parse_fast(&bytes).is_none(),
                "{name}: accepted by the fast path"
            );
            assert!(same_as_reference(&bytes).is_err(), "{name}: accepted");
        }
    }

    #[test]
    fn one_pass_parse_agrees_with_the_reference_on_edge_cases() {
        let base = samples::event_json("message", "s-1", "r-1", "support/router");
        let text = |v: &Value| serde_json::to_string(v).unwrap();
        let valid = text(&base);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = base.clone();
            f(&mut v);
            text(&v)
        };
        let mut cases: Vec<String> = vec![
            // Escapes, non-ASCII, whitespace, `data` before `type`, a trailing newline.
            with(&|v| v["data"]["text"] = json!("a \"quoted\" \\ line\nnext é 😀")),
            valid.replace(",\"", ",\n  \""),
            format!("{valid}\n"),
            format!(
                r#"{{"data":{{"text":"hi","role":"user"}},{}"#,
                &valid[1..].replace(r#","data":{"role":"assistant","text":"hello"}"#, "")
            ),
            // Repeated keys: a `Value` keeps the last one, so the reference accepts these.
            valid.replacen(r#""sequence":0"#, r#""sequence":5,"sequence":0"#, 1),
            valid.replacen(r#""text":"hello""#, r#""text":"","text":"hello""#, 1),
            // Types and ranges.
            with(&|v| v["sequence"] = json!(1.0)),
            with(&|v| v["sequence"] = json!(-1)),
            with(&|v| v["sequence"] = json!(u64::MAX)),
            with(&|v| v["sequence"] = json!("1")),
            with(&|v| v["data"]["text"] = json!("")),
            with(&|v| v["data"]["text"] = json!(null)),
            with(&|v| v["data"]["extra"] = json!(1)),
            with(&|v| v["data"] = json!([])),
            with(&|v| v["data"] = json!(null)),
            with(&|v| v["type"] = json!("status")),
            with(&|v| v["timestamp"] = json!("2026-02-30T00:00:00Z")),
            with(&|v| v["sessionId"] = json!("s\u{0}")),
            // Not JSON, or not one value.
            String::new(),
            "[]".into(),
            valid.replace("}", ""),
            format!("{valid} {{}}"),
            "{\"schema\":\"fleetward.event.v1\"".into(),
        ];
        for kind in [
            "message",
            "status",
            "tool_call",
            "tool_result",
            "approval_required",
            "approval_decision",
            "escalated",
            "resolved",
            "failed",
            "budget_exceeded",
            "halted",
            "resumed",
        ] {
            let mut v = samples::event_json(kind, "s-1", "r-1", "support/router");
            cases.push(text(&v));
            v["data"]["unknown"] = json!(true);
            cases.push(text(&v));
        }
        let mut resolved = samples::event_json("resolved", "s-1", "r-1", "support/router");
        resolved["data"]["verify"] = json!({"url": "http://svc/healthz", "delaySeconds": 3});
        cases.push(text(&resolved));
        resolved["data"]["verify"]["url"] = json!("ftp://svc");
        cases.push(text(&resolved));
        let mut accepted = 0;
        for c in &cases {
            accepted += usize::from(same_as_reference(c.as_bytes()).is_ok());
        }
        assert_eq!(accepted, 19, "the edge cases meant to be valid");
    }

    #[test]
    fn a_halt_needs_only_what_spec_names() {
        // SPEC §6: a control message has the switch's name, scope and generation; mode, drain
        // timeout and the agent list may be left out (null agents = absent = empty).
        let base = json!({"schema": "fleetward.control.v1", "id": "0b6f2d3e-5c1a-4e8b-9f7d-000000000050",
            "type": "halt", "killSwitch": "stop-billing", "generation": 1,
            "scope": {"namespaces": ["githouse"]}, "timestamp": "2025-06-02T09:00:40Z"});
        let mut with_null = base.clone();
        with_null["agents"] = Value::Null;
        for v in [base, with_null] {
            let c = ControlMessage::from_json(v).expect("a minimal halt is valid");
            assert!(c.agents.is_empty() && c.mode.is_none() && c.drain_timeout_seconds.is_none());
            assert!(c.covers("githouse/billing") && !c.covers("other/billing"));
        }
    }
}
