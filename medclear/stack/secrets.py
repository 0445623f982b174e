"""The stack's secrets and the environment of its processes.

Secrets (`SECRET_FIELDS`: the LMK, the card-token key, the two data keys, the SMPP
password): `write_secrets` puts each in an owner-only file under the state directory (a
given value that differs from the file's is an error: the data was made under it), read
only by the process that needs it (the LMK by the HSM). No child's environment holds any:
`child_env` leaves them out of medclear's own processes', `Process.start` strips them
from every child's (`medclear.stack.process.without_secrets`), and
tests/integration/test_terminal_security.py reads every /proc/PID/environ to prove it.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from clearing.redact import CONTACT, DATA_KEY_BYTES, PERSON
from hsm_sim.keystore import new_lmk_file
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import SECRET_FIELDS, KafkaSecurity, Settings, smsc_password_file
from medclear.infra.stack_state import StackError
from medclear.infra.tokens import card_token_key_file, data_key_file, ensure_key_file
from medclear.stack.process import SECRET_ENV


def write_secrets(settings: Settings, state_dir: Path) -> None:
    """Every secret in an owner-only file under the state directory, read only by the
    process that needs it: the LMK by the HSM, the card-token key by the processes that
    name cards, the SMPP password by the sms job. A secret given as a setting is written
    there (a file that already holds another value is an error: the data was made under
    it); one not given is made once, at random (the SMPP password excepted)."""
    local = settings.model_copy(update={"state_dir": state_dir})
    files = {
        "hsm_lmk": settings.hsm_lmk_file or state_dir / "hsm" / "lmk.hex",
        "card_token_key": card_token_key_file(local),
        "contact_data_key": data_key_file(local, CONTACT),
        "person_data_key": data_key_file(local, PERSON),
        "smsc_password": smsc_password_file(local),
    }
    for name, path in files.items():
        given = getattr(settings, name).get_secret_value()
        if given:
            write_secret_file(path, given, f"MEDCLEAR_{name.upper()}")
    if not files["hsm_lmk"].exists():
        new_lmk_file(files["hsm_lmk"])  # the embedded stack's own LMK
    ensure_key_file(files["card_token_key"])
    for name in ("contact_data_key", "person_data_key"):
        ensure_key_file(files[name], DATA_KEY_BYTES)


def write_secret_file(path: Path, value: str, setting: str) -> None:
    if path.exists():
        if path.read_text().strip() != value.strip():
            raise StackError(
                f"{setting} differs from the one in {path}, which the data "
                "of this state directory was made under; use that file"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value.strip() + "\n")


def child_env(
    settings: Settings, state_dir: Path, kafka: KafkaAccess, ch_url: str
) -> dict[str, str]:
    """The environment of medclear's own processes: this `up`'s settings, as MEDCLEAR_*,
    without any secret (each is in a file only the process that needs it reads), and how
    they reach the broker (each picks its own principal's certificate in the directory)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    for name, value in settings.model_dump(exclude=set(SECRET_FIELDS)).items():
        if value is None:
            continue
        if isinstance(value, Enum):
            value = value.value
        env[f"MEDCLEAR_{name.upper()}"] = str(value)
    env["MEDCLEAR_KAFKA_BOOTSTRAP"] = kafka.bootstrap
    env["MEDCLEAR_KAFKA_REPLICATION"] = str(kafka.replication)
    if kafka.ssl_dir is not None:
        env["MEDCLEAR_KAFKA_SECURITY"] = KafkaSecurity.SSL.value
        env["MEDCLEAR_KAFKA_SSL_DIR"] = str(kafka.ssl_dir)
    else:
        env["MEDCLEAR_KAFKA_SECURITY"] = KafkaSecurity.PLAINTEXT.value
        env.pop("MEDCLEAR_KAFKA_SSL_DIR", None)
    env["MEDCLEAR_CLICKHOUSE_URL"] = ch_url
    env["MEDCLEAR_STATE_DIR"] = str(state_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env
