"""A back end for the Icinga 2 REST API: ``POST /v1/actions/process-check-result``.

The future-proof passive transport: Icinga 2 deprecated the command pipe that NSCA writes
into (removal announced for v2.18), and unlike NSCA the API answers, so a wrong password
or an unknown service is an error here instead of a silently lost result.

Choices and what they rest on (Icinga 2 ``doc/12-icinga2-api.md``, ``apiactions.cpp``):

- the target is named with the simple ``service: "host!service"`` / ``host: "host"``
  parameters: no filter expression to quote, and no need for the ``filter-expression``
  permission that Icinga 2.16.2+ can enforce. Icinga refuses ``!`` in object names
  ("Object names may not contain '!'"), so such a name is rejected here, unsent;
- ``plugin_output`` holds the text only and ``performance_data`` the list: Icinga stores
  ``plugin_output`` verbatim and would not split a ``| perfdata`` tail off it;
- host results carry Icinga's host state (0 UP, 1 DOWN): any other value is a 400;
- one request per result, so that one unknown object does not cost the others, all on one
  kept-alive connection (``http.client``: urllib would pay a TLS handshake per result);
- TLS is always verified (the Icinga CA in ``cafile``); there is no switch to turn it
  off. Basic auth and/or a client certificate;
- the time a result was measured goes as ``execution_start`` and ``execution_end``: a
  result sent late from the spool is then recorded at the time it was true, not taken
  for the present state on arrival (NSCA and send_nsca have no field for it);
- ``verbose=1`` is asked for: Icinga 2.13 answers a missing permission with a 404
  "No objects found." whose only clue is the diagnostic; newer versions send 403.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Any

from nsca.errors import SubmitError
from nsca.result import PassiveResult

log = logging.getLogger(__name__)

ACTION_PATH = "/v1/actions/process-check-result"
PERMISSION = "actions/process-check-result"
USER_AGENT = "zettabee-passive/1"  # shows in Icinga's request log: who sent this


class Icinga2ApiError(SubmitError):
    """The API refused a result or could not be reached; ``status`` is the HTTP code if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        transient: bool = False,
        undelivered: Sequence[PassiveResult] | None = None,
        rejected: Sequence[PassiveResult] = (),
    ) -> None:
        self.status = status
        super().__init__(
            "icinga2-api",
            message,
            transient=transient,
            undelivered=undelivered,
            rejected=rejected,
        )


def request_body(
    result: PassiveResult, *, ttl: int | None = None, check_source: str | None = None
) -> dict[str, Any]:
    """The JSON body that submits ``result``."""
    if "!" in result.host or "!" in (result.service or ""):
        raise ValueError(f"Icinga object names may not contain '!': {result.object_name!r}")
    body: dict[str, Any]
    if result.service is None:
        body = {"type": "Host", "host": result.host, "exit_status": result.host_state()}
    else:
        body = {
            "type": "Service",
            "service": f"{result.host}!{result.service}",
            "exit_status": result.code,
        }
    body["plugin_output"] = result.output
    if result.perfdata:
        body["performance_data"] = list(result.perfdata)
    if result.measured_at is not None:
        body["execution_start"] = body["execution_end"] = result.measured_at
    if check_source:
        body["check_source"] = check_source
    if ttl:
        body["ttl"] = ttl
    return body


def make_ssl_context(
    cafile: str | None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A verifying client context: the given CA (or the system's), optional client cert."""
    context = ssl.create_default_context(cafile=cafile)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context


class Icinga2ApiBackend:
    """Submits results to an Icinga 2 API endpoint, one POST per result."""

    name = "icinga2-api"

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        timeout: float = 10.0,
        ttl: int | None = None,
        check_source: str | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise ValueError(f"the Icinga 2 API URL must be https://host[:port], not {url!r}")
        if parsed.username or parsed.password:
            raise ValueError("put the API user in user= and password=, not in the URL")
        self.url = f"https://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.user = user
        self.__password = password
        self.cafile = cafile
        self.certfile = certfile
        self.keyfile = keyfile
        self.timeout = timeout
        self.ttl = ttl
        self.check_source = check_source
        try:
            self._context = make_ssl_context(cafile, certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS files for {self.url}: {exc}") from exc
        self._host = parsed.hostname
        self._port = parsed.port or 443
        self._path = parsed.path.rstrip("/") + ACTION_PATH + "?verbose=1"

    def __repr__(self) -> str:
        return (
            f"Icinga2ApiBackend(url={self.url!r}, user={self.user!r}, cafile={self.cafile!r}, "
            f"certfile={self.certfile!r}, password={'<set>' if self.__password else None})"
        )

    @property
    def endpoint(self) -> str:
        return self.url + ACTION_PATH

    def submit(self, results: Sequence[PassiveResult]) -> None:
        """POST every result on one kept-alive connection; raise one error naming failures.

        A failure that says the server or our credentials are wrong stops at once (the rest
        would fail alike); an unknown object only rejects its own result.
        """
        rejected: list[PassiveResult] = []
        messages: list[str] = []
        status: int | None = None
        connection = _Connection(self)
        try:
            for index, result in enumerate(results):
                try:
                    self._post(connection, result)
                except Icinga2ApiError as exc:
                    if not exc.rejected:
                        raise Icinga2ApiError(
                            "; ".join([*messages, exc.message]),
                            status=exc.status,
                            transient=exc.transient,
                            undelivered=[*rejected, *results[index:]],
                            rejected=rejected,
                        ) from exc
                    rejected.append(result)
                    messages.append(exc.message)
                    status = status or exc.status
        finally:
            connection.close()
        if rejected:
            raise Icinga2ApiError(
                "; ".join(messages), status=status, undelivered=rejected, rejected=rejected
            )

    def _post(self, connection: _Connection, result: PassiveResult) -> None:
        try:
            body = json.dumps(request_body(result, ttl=self.ttl, check_source=self.check_source))
        except ValueError as exc:
            raise Icinga2ApiError(str(exc), undelivered=[result], rejected=[result]) from exc
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        if self.user is not None:
            token = base64.b64encode(f"{self.user}:{self.__password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            status, payload = connection.post(self._path, body.encode(), headers)
        except (OSError, http.client.HTTPException) as exc:
            raise self._connection_error(exc, result) from exc
        self._check(status, payload, result)
        log.debug("icinga2-api: %s accepted for %s", result.state_name, result.object_name)

    def _connection_error(self, reason: object, result: PassiveResult) -> Icinga2ApiError:
        if isinstance(reason, ssl.SSLCertVerificationError):
            why = str(reason.verify_message).rstrip(".")
            return Icinga2ApiError(
                f"TLS verification of {self.url} failed: {why}. The cafile= "
                f"({self.cafile or 'system CA store'}) must hold the CA that signed the Icinga "
                "certificate (its ca.crt), and the URL's host name must be in the certificate",
                undelivered=[result],
            )
        if isinstance(reason, ssl.SSLError):
            return Icinga2ApiError(
                f"TLS handshake with {self.url} failed: {reason}", undelivered=[result]
            )
        if isinstance(reason, ConnectionRefusedError):
            return Icinga2ApiError(
                f"connection to {self.url} refused: is icinga2 running with the api feature "
                "listening there?",
                transient=True,
                undelivered=[result],
            )
        if isinstance(reason, TimeoutError):
            return Icinga2ApiError(
                f"no answer from {self.url} within {self.timeout:g} s",
                transient=True,
                undelivered=[result],
            )
        text = getattr(reason, "strerror", None) or str(reason)
        return Icinga2ApiError(
            f"cannot reach {self.url}: {text}", transient=True, undelivered=[result]
        )

    def _check(self, status: int, payload: dict[str, Any], result: PassiveResult) -> None:
        """Turn the answer into an error when the result was not processed.

        Icinga 2.13+ mirrors a single object's result in the HTTP status; older versions
        answer 200 and put the real code in ``results[].code``, so both are read.
        """
        codes = [
            (int(r.get("code", 0)), str(r.get("status", "")))
            for r in payload.get("results", [])
            if isinstance(r, dict)
        ]
        if 200 <= status < 300 and codes and all(200 <= c < 300 for c, _ in codes):
            return
        if 200 <= status < 300 and codes:
            status, said = next((c, s) for c, s in codes if not 200 <= c < 300)
        elif 200 <= status < 300:
            raise Icinga2ApiError(
                f"{self.url} answered {status} without results for {result.object_name!r}",
                status=status,
                undelivered=[result],
            )
        else:
            said = str(payload.get("status", "")) or (codes[0][1] if codes else "")
        diagnostic = str(payload.get("diagnostic_information", "")).strip().splitlines()
        clue = diagnostic[0] if diagnostic else ""
        raise self._status_error(status, said, clue, result)

    def _status_error(
        self, status: int, said: str, clue: str, result: PassiveResult
    ) -> Icinga2ApiError:
        kind = "Host" if result.is_host_check else "Service"
        name = result.object_name
        user = f"ApiUser {self.user!r}" if self.user else "the ApiUser of this certificate"
        if status == 403 or "missing permission" in clue.lower():
            if "passive checks are disabled" in said.lower():
                return Icinga2ApiError(
                    f"passive checks are disabled for {kind} {name!r}: set "
                    "enable_passive_checks = true on it",
                    status=status,
                    undelivered=[result],
                    rejected=[result],
                )
            return Icinga2ApiError(
                f"{user} lacks the permission {PERMISSION} on {self.url} "
                f"(Icinga said: {clue or said or status}); add it to the ApiUser's permissions",
                status=status,
                undelivered=[result],
            )
        if status == 401:
            return Icinga2ApiError(
                f"{self.url} refused the credentials of {user} (401): check user= and password=",
                status=status,
                undelivered=[result],
            )
        if status == 404:
            return Icinga2ApiError(
                f"Icinga at {self.url} has no {kind} object {name!r} (404 {said or 'not found'}): "
                f"define it, or fix the host/service name",
                status=status,
                undelivered=[result],
                rejected=[result],
            )
        if status == 409:
            return Icinga2ApiError(
                f"{kind} {name!r} already has a newer check result (409 {said}): this one is "
                "out of date and was dropped",
                status=status,
                undelivered=[result],
                rejected=[result],
            )
        if status == 400:
            return Icinga2ApiError(
                f"Icinga refused the result for {kind} {name!r} as invalid (400 {said})",
                status=status,
                undelivered=[result],
                rejected=[result],
            )
        if status >= 500:
            return Icinga2ApiError(
                f"Icinga at {self.url} failed processing the result for {kind} {name!r} "
                f"({status} {said}{': ' + clue if clue else ''})",
                status=status,
                transient=True,
                undelivered=[result],
            )
        return Icinga2ApiError(
            f"unexpected answer {status} from {self.url} for {kind} {name!r}: {said}",
            status=status,
            undelivered=[result],
        )


class _Connection:
    """One HTTPS connection kept alive across the results of a submit.

    A TLS handshake with Icinga's 4096-bit keys costs about 30 ms here, a request on an
    open connection under 1 ms: a run that reports a thousand pairs should not pay the
    handshake a thousand times (urllib cannot keep a connection open, hence http.client).
    A kept-alive connection that the server closed meanwhile is reopened once.
    """

    def __init__(self, backend: Icinga2ApiBackend) -> None:
        self.backend = backend
        self.connection: http.client.HTTPSConnection | None = None
        self.used = False

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPSConnection(
                    self.backend._host,
                    self.backend._port,
                    context=self.backend._context,
                    timeout=self.backend.timeout,
                )
                self.used = False
            try:
                self.connection.request("POST", path, body, headers)
                response = self.connection.getresponse()
                status, payload = response.status, _json(response.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                stale = self.used and attempt == 1
                self.close()
                if stale:
                    continue
                raise
            self.used = True
            if response.will_close:
                self.close()
            return status, payload
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _json(raw: bytes) -> dict[str, Any]:
    """The JSON object of an answer, or ``{"status": <text>}`` when it is not JSON."""
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"status": raw.decode(errors="replace").strip()[:200]}
    return value if isinstance(value, dict) else {"status": str(value)[:200]}
