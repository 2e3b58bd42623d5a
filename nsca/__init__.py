"""Passive submission of check results: NSCA, send_nsca and the Icinga 2 API.

Standard library only, so that it can be used (and vendored) without zettabee's own
dependencies. ``make_backend`` picks a back end from config strings; every back end
raises :class:`SubmitError`; :class:`Spool` keeps what could not be delivered.
"""

from nsca.backends import KINDS, Backend, NscaBackend, make_backend
from nsca.client import Encryption, NscaClient
from nsca.errors import BackendConfigError, NscaError, SubmitError
from nsca.icinga2api import Icinga2ApiBackend, Icinga2ApiError
from nsca.result import PassiveResult
from nsca.sendnsca import SendNscaBackend
from nsca.spool import FlushReport, Spool

__all__ = [
    "KINDS",
    "Backend",
    "BackendConfigError",
    "Encryption",
    "FlushReport",
    "Icinga2ApiBackend",
    "Icinga2ApiError",
    "NscaBackend",
    "NscaClient",
    "NscaError",
    "PassiveResult",
    "SendNscaBackend",
    "Spool",
    "SubmitError",
    "make_backend",
]
