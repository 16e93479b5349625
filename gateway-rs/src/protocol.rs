//! The WebSocket frames of SPEC §5.1 (client frames in, event and control frames out) and the
//! envelopes the gateway builds: commands from client frames, control acks, verification
//! alerts. The envelope types and their validation live in `envelopes` (re-exported here).
//!
//! Alerts (topic `fleetward.alerts`) are `fleetward.alert.v1` envelopes of the shared contract
//! (`fleetward.api.envelopes.alerts`, `schemas/envelopes.schema.json`); the gateway produces
//! `verification_failed` ones and never reads any, so it has no parser for them: its output is
//! checked against the Python models in tests/integration/test_gateway_control.py.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::envelopes::Component;
pub use crate::envelopes::{
    ALERT_SCHEMA, AckType, AgentCommand, COMMAND_SCHEMA, CONTROL_ACK_SCHEMA, CommandType, CommandUser, ControlAck,
    ControlMessage, ControlType, Decision, EventType, Invalid, Role, SessionEvent, TEXT_MAX, check_edit, from_value,
    invalid, is_agent_ref, is_session_id,
};

pub fn parse_rfc3339(s: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(s).ok()
}

/// Now, as RFC 3339 UTC with milliseconds (the envelopes' timestamp form).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

// -- commands the gateway produces ----------------------------------------------------------

/// Everything the gateway needs to build a command; ids and time are filled in here.
pub struct CommandInput<'a> {
    pub session_id: &'a str,
    pub agent: &'a str,
    pub user: CommandUser,
    pub trace_id: Option<String>,
    pub idempotency_key: Option<String>,
}

impl AgentCommand {
    fn new(kind: CommandType, input: CommandInput<'_>, data: Map<String, Value>) -> AgentCommand {
        let id = uuid::Uuid::new_v4().to_string();
        AgentCommand {
            schema: COMMAND_SCHEMA.to_string(),
            idempotency_key: input.idempotency_key.unwrap_or_else(|| id.clone()),
            id,
            kind,
            session_id: input.session_id.to_string(),
            agent: input.agent.to_string(),
            timestamp: now_rfc3339(),
            trace_id: input.trace_id,
            user: Some(input.user),
            data,
        }
    }

    pub fn user_message(input: CommandInput<'_>, text: &str) -> AgentCommand {
        let mut data = Map::new();
        data.insert("text".into(), Value::String(text.to_string()));
        Self::new(CommandType::UserMessage, input, data)
    }

    pub fn resume(input: CommandInput<'_>, run_id: &str, decision: Decision, edit: Option<&str>) -> AgentCommand {
        let reviewer = input.user.sub.clone();
        let mut data = Map::new();
        data.insert("runId".into(), Value::String(run_id.to_string()));
        data.insert(
            "decision".into(),
            serde_json::to_value(decision).expect("enum serializes"),
        );
        if let Some(e) = edit {
            data.insert("edit".into(), Value::String(e.to_string()));
        }
        data.insert("reviewer".into(), Value::String(reviewer));
        Self::new(CommandType::Resume, input, data)
    }
}

// -- acks and alerts the gateway produces ---------------------------------------------------

impl ControlAck {
    /// The gateway's ack of a halt/resume: counts {"sessionsClosed"}.
    pub fn gateway(msg: &ControlMessage, kind: AckType, instance: &str, sessions_closed: u64) -> ControlAck {
        let mut counts = std::collections::BTreeMap::new();
        counts.insert("sessionsClosed".to_string(), sessions_closed);
        ControlAck {
            schema: CONTROL_ACK_SCHEMA.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            kill_switch: msg.kill_switch.clone(),
            generation: msg.generation,
            instance: instance.to_string(),
            component: Component::Gateway,
            agents: msg.agents.clone(),
            counts,
            runs: Vec::new(),
            timestamp: now_rfc3339(),
        }
    }
}

/// Namespace of the verification alerts' ids (uuid v5 of the `resolved` event's id).
const VERIFICATION_ALERT_IDS: uuid::Uuid = uuid::Uuid::from_u128(0x6c1e_2b7a_94d3_4f08_a5e1_3d7c_0b9f_8e21);

/// An alert (topic `fleetward.alerts`): here, an after-runner verification that failed. Its id
/// is derived from the `resolved` event's: checks run at least once (verify.rs), so a check
/// repeated after its partition moved repeats the alert's id too, and a consumer can drop it.
pub fn verification_alert(
    ev: &SessionEvent,
    url: &str,
    delay_seconds: u64,
    status: Option<u16>,
    error: Option<&str>,
) -> Value {
    json!({
        "schema": ALERT_SCHEMA,
        "id": uuid::Uuid::new_v5(&VERIFICATION_ALERT_IDS, ev.id.as_bytes()).to_string(),
        "type": "verification_failed",
        "sessionId": ev.session_id,
        "agent": ev.agent,
        "runId": ev.run_id,
        "traceId": ev.trace_id,
        "timestamp": now_rfc3339(),
        "data": {
            "url": url,
            "delaySeconds": delay_seconds,
            "status": status,
            "error": error,
            "resolvedEventId": ev.id,
        },
    })
}

// -- WebSocket frames -----------------------------------------------------------------------

/// A client -> server frame (SPEC §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    UserMessage {
        text: String,
        client_message_id: Option<String>,
    },
    ApprovalDecision {
        run_id: String,
        decision: Decision,
        edit: Option<String>,
    },
}

// Unknown fields of client frames are ignored, not refused: a client library may add its
// own (a local id, a timestamp), and identity fields a client writes (`sub`, `role`, `user`,
// `reviewer`) are never read: the command carries the verified token's identity only.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserMessageFrame {
    #[serde(rename = "type")]
    _type: String,
    text: String,
    #[serde(default)]
    client_message_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApprovalDecisionFrame {
    #[serde(rename = "type")]
    _type: String,
    run_id: String,
    decision: Decision,
    #[serde(default)]
    edit: Option<String>,
}

impl ClientFrame {
    /// Parse and validate a client text frame; the error names the field and the rule.
    pub fn parse(text: &str) -> Result<ClientFrame, Invalid> {
        let v: Value = serde_json::from_str(text).map_err(|e| Invalid {
            field: "$".into(),
            problem: format!("not JSON: {e}"),
        })?;
        let Some(obj) = v.as_object() else {
            return invalid("$", "a frame is a JSON object");
        };
        let kind = match obj.get("type") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return invalid("type", "must be a string"),
            None => {
                return invalid("type", "missing; one of \"user_message\", \"approval_decision\"");
            }
        };
        match kind.as_str() {
            "user_message" => {
                let f: UserMessageFrame = from_value("frame", v)?;
                // Blank messages are refused here although the contract's Text only needs one character.
                if f.text.trim().is_empty() {
                    return invalid("text", "must not be empty or blank");
                }
                if f.text.chars().count() > TEXT_MAX {
                    return invalid("text", format!("longer than {TEXT_MAX} characters"));
                }
                if let Some(id) = &f.client_message_id
                    && !(id.len() <= 127 && crate::envelopes::is_id_chars(id))
                {
                    return invalid("clientMessageId", "must be 1-127 characters of [A-Za-z0-9._:-]");
                }
                Ok(ClientFrame::UserMessage {
                    text: f.text,
                    client_message_id: f.client_message_id,
                })
            }
            "approval_decision" => {
                let f: ApprovalDecisionFrame = from_value("frame", v)?;
                if !is_session_id(&f.run_id) {
                    return invalid("runId", "must be 1-128 characters of [A-Za-z0-9._:-]");
                }
                // A client helper may always send `edit`: an empty one with approve/reject counts
                // as absent (nothing is produced for it). The command keeps the shared contract's
                // rule: `edit` exactly when the decision is "edit" (a blank edit there is refused).
                let edit = match (f.decision, f.edit) {
                    (Decision::Approve | Decision::Reject, Some(e)) if e.is_empty() => None,
                    (_, e) => e,
                };
                check_edit("edit", f.decision, edit.as_deref())?;
                Ok(ClientFrame::ApprovalDecision {
                    run_id: f.run_id,
                    decision: f.decision,
                    edit,
                })
            }
            other => invalid(
                "type",
                format!("{other:?} is not one of \"user_message\", \"approval_decision\""),
            ),
        }
    }
}

/// `{"position": "<p>:<o>", "event": <raw event>}` built around the event bytes as read from
/// Kafka (already validated), so each event is serialized once whatever the number of clients.
pub fn event_frame(position: crate::history::Position, raw_event: &[u8]) -> String {
    use std::fmt::Write;
    let raw = std::str::from_utf8(raw_event).unwrap_or("null");
    let mut s = String::with_capacity(raw.len() + 40);
    s.push_str("{\"position\":\"");
    // Formatted in place (no temporary string): this runs for every event.
    let _ = write!(s, "{position}");
    s.push_str("\",\"event\":");
    s.push_str(raw.trim());
    s.push('}');
    s
}

/// `{"control":"error","code":...,"message":...}`: a refused client frame.
pub fn error_frame(code: &str, message: &str) -> String {
    json!({"control": "error", "code": code, "message": message}).to_string()
}

/// `{"control":"recovery_failed",...}`: the missed events cannot be delivered.
pub fn recovery_failed_frame(since: &str, reason: &str) -> String {
    json!({"control": "recovery_failed", "since": since, "reason": reason}).to_string()
}

/// `{"control":"halted",...}`: a kill switch stopped this session's agent.
pub fn halted_frame(kill_switch: &str, generation: u64, agent: &str, reason: Option<&str>) -> String {
    json!({"control": "halted", "killSwitch": kill_switch, "generation": generation, "agent": agent, "reason": reason})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::envelopes::samples::event_json;
    use crate::envelopes::{CONTROL_SCHEMA, EVENT_SCHEMA};

    #[test]
    fn a_repeated_check_repeats_its_alert_id() {
        let resolved = |session: &str| SessionEvent::from_json(event_json("resolved", session, "r-1", "ns/a")).unwrap();
        let (a, b) = (resolved("s-1"), resolved("s-2"));
        let first = verification_alert(&a, "http://svc/healthz", 60, Some(503), None);
        let again = verification_alert(&a, "http://svc/healthz", 60, None, Some("timed out"));
        let other = verification_alert(&b, "http://svc/healthz", 60, Some(503), None);
        assert_eq!(first["id"], again["id"]);
        assert_ne!(first["id"], other["id"]);
        assert_eq!(first["data"]["resolvedEventId"], a.id.as_str());
    }

    #[test]
    fn event_parses_and_rejects_bad_fields() {
        assert!(SessionEvent::from_json(event_json("message", "s-1", "r-1", "support/router")).is_ok());
        let mut v = event_json("message", "s 1", "r-1", "support/router");
        assert_eq!(SessionEvent::from_json(v.clone()).unwrap_err().field, "sessionId");
        v = event_json("nonsense", "s-1", "r-1", "support/router");
        assert!(SessionEvent::from_json(v).is_err());
        v = event_json("message", "s-1", "r-1", "support/router");
        v["traceId"] = json!("ABC");
        assert_eq!(SessionEvent::from_json(v).unwrap_err().field, "traceId");
        v = event_json("message", "s-1", "r-1", "support/router");
        v["agent"] = json!("router");
        assert_eq!(SessionEvent::from_json(v).unwrap_err().field, "agent");
        v = event_json("message", "s-1", "r-1", "support/router");
        v["sequence"] = json!(-1);
        assert!(SessionEvent::from_json(v).is_err());
        v = event_json("message", "s-1", "r-1", "support/router");
        v["extra"] = json!(1);
        assert!(SessionEvent::from_json(v).is_err());
    }

    #[test]
    fn client_frames_validate() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"user_message","text":"hello"}"#).unwrap(),
            ClientFrame::UserMessage {
                text: "hello".into(),
                client_message_id: None
            }
        );
        let d =
            ClientFrame::parse(r#"{"type":"approval_decision","runId":"r1","decision":"edit","edit":"x"}"#).unwrap();
        assert_eq!(
            d,
            ClientFrame::ApprovalDecision {
                run_id: "r1".into(),
                decision: Decision::Edit,
                edit: Some("x".into())
            }
        );
        for (bad, field) in [
            ("not json", "$"),
            ("[1]", "$"),
            (r#"{"text":"x"}"#, "type"),
            (r#"{"type":"shout","text":"x"}"#, "type"),
            (r#"{"type":"user_message","text":"   "}"#, "text"),
            (r#"{"type":"user_message"}"#, "frame"),
            (r#"{"type":"approval_decision","runId":"r1","decision":"edit"}"#, "edit"),
            (
                r#"{"type":"approval_decision","runId":"r1","decision":"approve","edit":"x"}"#,
                "edit",
            ),
            (
                r#"{"type":"approval_decision","runId":"r1","decision":"reject","edit":" "}"#,
                "edit",
            ),
            (
                r#"{"type":"approval_decision","runId":"r1","decision":"edit","edit":""}"#,
                "edit",
            ),
            (
                r#"{"type":"approval_decision","runId":"r1","decision":"edit","edit":null}"#,
                "edit",
            ),
            (
                r#"{"type":"approval_decision","runId":"r1","decision":"maybe"}"#,
                "decision",
            ),
            (
                r#"{"type":"approval_decision","runId":"","decision":"approve"}"#,
                "runId",
            ),
        ] {
            let e = ClientFrame::parse(bad).unwrap_err();
            assert_eq!(e.field, field, "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_claimed_identities_never_read() {
        let m = ClientFrame::parse(
            r#"{"type":"user_message","text":"hi","sub":"mallory","role":"operator","user":{"sub":"x"},"at":1}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientFrame::UserMessage {
                text: "hi".into(),
                client_message_id: None
            }
        );
        let d = ClientFrame::parse(
            r#"{"type":"approval_decision","runId":"r1","decision":"approve","reviewer":{"sub":"mallory"},"role":"operator"}"#,
        )
        .unwrap();
        assert_eq!(
            d,
            ClientFrame::ApprovalDecision {
                run_id: "r1".into(),
                decision: Decision::Approve,
                edit: None
            }
        );
    }

    #[test]
    fn empty_edit_with_approve_or_reject_counts_as_absent() {
        for (decision, want) in [("approve", Decision::Approve), ("reject", Decision::Reject)] {
            for edit in [r#","edit":"""#, r#","edit":null"#, ""] {
                let frame = format!(r#"{{"type":"approval_decision","runId":"r1","decision":"{decision}"{edit}}}"#);
                assert_eq!(
                    ClientFrame::parse(&frame).unwrap(),
                    ClientFrame::ApprovalDecision {
                        run_id: "r1".into(),
                        decision: want,
                        edit: None
                    },
                    "{frame}"
                );
            }
            // Non-empty text with approve/reject is still refused, with the same rule.
            let frame = format!(r#"{{"type":"approval_decision","runId":"r1","decision":"{decision}","edit":"x"}}"#);
            let e = ClientFrame::parse(&frame).unwrap_err();
            assert_eq!(e.field, "edit");
            assert!(e.problem.contains("not allowed"), "{e}");
        }
        // The command produced for such a frame carries no `edit` and passes the shared contract.
        let ClientFrame::ApprovalDecision { run_id, decision, edit } =
            ClientFrame::parse(r#"{"type":"approval_decision","runId":"r1","decision":"approve","edit":""}"#).unwrap()
        else {
            panic!("an approval decision");
        };
        let v = serde_json::to_value(AgentCommand::resume(
            reviewer_input(),
            &run_id,
            decision,
            edit.as_deref(),
        ))
        .unwrap();
        assert!(v["data"].get("edit").is_none(), "{v}");
        AgentCommand::from_json(v).unwrap();
        // The envelope rule itself stays strict: an empty edit on a command is refused.
        assert!(check_edit("data.edit", Decision::Approve, Some("")).is_err());
    }

    /// A reviewer's command input, as the gateway builds it from a verified token.
    fn reviewer_input() -> CommandInput<'static> {
        CommandInput {
            session_id: "s-1",
            agent: "support/router",
            user: CommandUser {
                sub: "alice".into(),
                role: Role::Reviewer,
            },
            trace_id: None,
            idempotency_key: None,
        }
    }

    #[test]
    fn commands_built_by_the_gateway_are_valid() {
        let input = reviewer_input;
        let c = AgentCommand::user_message(input(), "hello");
        let round = AgentCommand::from_json(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(round, c);
        let r = AgentCommand::resume(input(), "run-7", Decision::Edit, Some("use v2"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["data"]["reviewer"], "alice");
        assert_eq!(v["data"]["decision"], "edit");
        AgentCommand::from_json(v).unwrap();
    }

    #[test]
    fn event_frame_wraps_raw_event() {
        let raw = serde_json::to_vec(&event_json("message", "s-1", "r-1", "support/router")).unwrap();
        let f = event_frame(
            crate::history::Position {
                partition: 2,
                offset: 41,
            },
            &raw,
        );
        let v: Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["position"], "2:41");
        assert_eq!(v["event"]["schema"], EVENT_SCHEMA);
    }

    #[test]
    fn control_covers() {
        let v = json!({"schema": CONTROL_SCHEMA, "id": uuid::Uuid::new_v4().to_string(), "type": "halt",
            "killSwitch": "all-stop", "generation": 3, "agents": [], "mode": "drain", "drainTimeoutSeconds": 30,
            "timestamp": "2026-01-02T03:04:05Z"});
        let c = ControlMessage::from_json(v.clone()).unwrap();
        assert!(c.covers("a/b"));
        let mut v2 = v;
        v2["agents"] = json!(["ns/x"]);
        let c = ControlMessage::from_json(v2).unwrap();
        assert!(c.covers("ns/x") && !c.covers("ns/y"));
        let ack = ControlAck::gateway(&c, AckType::Halted, "gw-0", 2);
        let back = ControlAck::from_json(serde_json::to_value(&ack).unwrap()).unwrap();
        assert_eq!(back.counts["sessionsClosed"], 2);
    }
}
