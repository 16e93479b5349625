"""The operator's audit log when its database is not up yet (the chart's own PostgreSQL
starts beside the operator): the operator starts anyway, and a later record opens the log
and is written, instead of the operator running without an audit chain until restarted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from unittest import mock

from fleetward.operator import audit as operator_audit
from fleetward.operator.audit import OperatorAudit

from fleetward.audit import AuditError, AuditLog


def test_a_log_that_could_not_be_opened_at_start_is_opened_by_a_later_record(tmp_path: Path):
    dsn = f"sqlite:///{tmp_path / 'audit.db'}"
    attempts: list[int] = []

    def opener() -> AuditLog:
        attempts.append(1)
        if len(attempts) == 1:
            raise AuditError("cannot connect to the audit database: connection refused")
        return AuditLog.open(dsn)

    with mock.patch.object(operator_audit, "REOPEN_SECONDS", 0.0):
        try:
            first = opener()
        except AuditError:
            first = None
        audit = OperatorAudit(first, opener)
        assert audit.log is None
        asyncio.run(audit.config_changed("shop/billing", 1, None, "abc123"))
    assert len(attempts) == 2
    with AuditLog.open(dsn, create=False) as log:
        (record,) = list(log.records())
        assert record["target"] == "agent/shop/billing" and record["details"]["configHash"] == "abc123"
    audit.close()


def test_reopening_is_not_tried_on_every_record_while_the_database_stays_down():
    calls: list[int] = []

    def opener() -> AuditLog:
        calls.append(1)
        raise AuditError("cannot connect to the audit database: connection refused")

    audit = OperatorAudit(None, opener)
    for _ in range(5):
        asyncio.run(audit.config_changed("shop/billing", 1, None, "abc123"))
    assert len(calls) == 1  # then it waits REOPEN_SECONDS before the next attempt
    assert audit.log is None
