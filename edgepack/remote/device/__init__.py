"""The device program: what runs ON the device, standard library only, at the device's oldest Python (3.7).

Small modules, assembled into one text by `edgepack.remote.program.device_program()` and sent whole on stdin
(`python3 -`), never written to the device to run; the same text is the Ansible role's `files/edgepack-device.py`.
Here in the package each module is importable and tested like any other; the names below are its public API."""

from edgepack.bundle_format import FOLDER_RE, ID_RE

from .apply import UPLOAD_ARCHIVE, apply, rollback_now, stage, unpack
from .facts import facts
from .files import hashes, mkdirs, remove_extra, reuse, verify
from .lock import OP_ENV
from .releases import locate, prune, publish, rollback, status, switch
from .rules import Refused
from .service import UNIT_DIRS, install_unit, service_check, service_start, service_status, service_stop, unit_name
from .signature import add_signature, admit, ed25519_verify, minisign_public_key, signature_check, trust, trusted_keys

__all__ = ["FOLDER_RE", "ID_RE", "OP_ENV", "UNIT_DIRS", "UPLOAD_ARCHIVE", "Refused", "add_signature", "admit",
           "apply", "ed25519_verify", "facts", "hashes", "install_unit", "locate", "minisign_public_key", "mkdirs",
           "prune", "publish", "remove_extra", "reuse", "rollback", "rollback_now", "service_check", "service_start",
           "service_status", "service_stop", "signature_check", "stage", "status", "switch", "trust", "trusted_keys",
           "unit_name", "unpack", "verify"]
