"""How a watched run speaks: alerts (one console line each, on the ``gradscope``
logger; one TensorBoard text entry for all alerts of a step; ``on_finding``)
and the run summary at close.  Only rank 0 prints and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from gradscope.distributed import is_writer
from gradscope.report import Finding, Report, Severity
from gradscope.watching.alerts import Alert, AlertTracker, run_summary
from gradscope.watching.divergence import NonfiniteSpans

logger = logging.getLogger("gradscope")


class Announcer:
    """Turns each observation of findings into alerts and says them."""

    def __init__(
        self, writer: Any, on_finding: Callable[[Finding], Any] | None, spans: NonfiniteSpans | None = None
    ) -> None:
        self.writer = writer
        self.on_finding = on_finding
        self.tracker = AlertTracker()
        # At a non-finite step and within an open episode the statistics are NaN/inf
        # or the blow-up's: only the nonfinite source speaks.  The other rules'
        # findings neither appear nor clear (a rule that reads NaN finds nothing,
        # which is not a recovery); they speak again once the episode clears.
        self.spans = spans if spans is not None else NonfiniteSpans()

    def alert(self, step: int, sources: dict[str, list[Finding]], partial: Collection[str] = ()) -> list[Alert]:
        """Feed one observation to the tracker and announce its alerts (one TensorBoard
        text entry for all of them); ``partial``: see ``AlertTracker.observe``."""
        if self.spans.excludes(step):
            sources = {name: found for name, found in sources.items() if name == "nonfinite"}
        alerts = self.tracker.observe(step, sources, partial)
        if not alerts:
            return alerts
        details = "scope.report()"
        if self.writer is not None:
            details += f"; TensorBoard {self.writer.logdir}, Text tab"
            self.writer.write_alerts(step, [alert.markdown() for alert in alerts])
        for alert in alerts:
            self.announce(alert, details)
        return alerts

    def announce(self, alert: Alert, details: str) -> None:
        """Log one alert (always: ``on_finding`` is called in addition), and pass
        findings that appear, escalate or move to ``on_finding``."""
        # Loud by default for what needs acting on: without a handler configured,
        # logging's last-resort handler prints warnings and errors to stderr.
        # Information (a prediction for fp16 on an fp32 run, decayed biases) goes
        # at INFO: in the report, the run summary's counts and TensorBoard, and on
        # the console once logging is configured to show it; printed as warnings,
        # a healthy fp32 BERT run logged six of them.
        severity = Severity(alert.finding.severity)
        if severity is Severity.INFO:
            level = logging.INFO
        elif severity is Severity.ERROR and alert.kind != "cleared":
            level = logging.ERROR
        else:
            level = logging.WARNING
        if is_writer():  # one voice per job: rank 0 prints
            logger.log(level, "%s", alert.line(details))
        if self.on_finding is not None and alert.kind != "cleared":
            self.on_finding(alert.finding)  # on every rank: each saw the same reduced numbers

    def print_summary(self, report: Report) -> None:
        """The run summary, on the gradscope logger (WARNING: shown without logging configured;
        silence it with ``logging.getLogger("gradscope").setLevel(logging.ERROR)``)."""
        if not is_writer():
            return  # one voice per job: rank 0 prints
        dashboards = self.writer.logdir if self.writer is not None else None
        text = run_summary(report.analysis.get("training", {}), report.findings, self.tracker.counts, dashboards)
        logger.warning("%s", text)
