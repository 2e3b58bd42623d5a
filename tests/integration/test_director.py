"""The Director basket restored into a real Icinga Director, twice, and rendered for Icinga 2.

The lab (lab/director.py) runs its own MariaDB and Icinga Web 2 config dir in a temp
dir. Debian 12 ships Director 1.10, which knows no basket UUIDs: there the lab restores
the basket without them and the Director matches objects by name; Director 1.11 and
later match by the basket's fixed UUIDs first.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.director import DirectorLab, missing_binaries

REPO = Path(__file__).resolve().parents[2]
BASKET = REPO / "icinga-conf" / "director" / "zettabee-basket.json"

STRING = "Icinga\\Module\\Director\\DataType\\DataTypeString"
BOOLEAN = "Icinga\\Module\\Director\\DataType\\DataTypeBoolean"
NUMBER = "Icinga\\Module\\Director\\DataType\\DataTypeNumber"
PARAMETERS = {
    "config": STRING,
    "settings": STRING,
    "warning": STRING,
    "critical": STRING,
    "timeout": NUMBER,
    "verbose": BOOLEAN,
    "destination": STRING,
}
EXPECTED_FIELDS = {f"zettabee_lag_{p}": t for p, t in PARAMETERS.items()}
EXPECTED_FIELDS["zettabee_lag_all"] = BOOLEAN
EXPECTED_FIELDS.update({f"zettabee_runtime_{p}": t for p, t in PARAMETERS.items()})
TEMPLATES = ("zettabee-lag", "zettabee-runtime", "zettabee-passive")


def load_basket() -> dict[str, Any]:
    return json.loads(BASKET.read_text())


def test_basket_carries_fixed_unique_uuids() -> None:
    """Director 1.11+ matches by these on re-import; a copied UUID would merge objects."""
    basket = load_basket()
    seen = []
    for type_name in ("Command", "ServiceTemplate", "Datafield"):
        for key, obj in basket[type_name].items():
            assert "uuid" in obj, f"{type_name} {key} has no uuid"
            seen.append(str(uuid.UUID(obj["uuid"])))
    assert len(seen) == len(set(seen)) == 2 + 3 + len(EXPECTED_FIELDS)
    # The ITL's "passive" is a reference only: no UUID, or the basket would re-key the
    # command that the kickstart imported.
    assert basket["ExternalCommand"] == {
        "passive": {
            "object_name": "passive",
            "object_type": "external_object",
            "methods_execute": "PluginCheck",
        }
    }


@pytest.fixture(scope="module")
def director() -> Iterator[DirectorLab]:
    if os.geteuid() != 0:
        pytest.skip("the Director lab needs root (mariadbd --user=root)")
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"not installed: {', '.join(missing)} (Debian packages mariadb-server icingaweb2"
            " icingaweb2-module-director icingacli php-mysql)"
        )
    with DirectorLab() as lab:
        yield lab


def snapshot(lab: DirectorLab) -> dict[str, Any]:
    """Everything a restore could change, as the Director shows it."""
    return {
        "activity": lab.activity_count(),
        "fields": lab.datafields(),
        "commands": {
            name: lab.show_json("command", name) for name in ("zettabee_lag", "zettabee_runtime")
        },
        "templates": {name: lab.show_json("service", name) for name in TEMPLATES},
        "rendered": [
            lab.render("command", "zettabee_lag"),
            lab.render("service", "zettabee-passive"),
        ],
    }


@pytest.mark.integration
def test_basket_restores_twice_without_changes(director: DirectorLab) -> None:
    before = director.activity_count()
    assert "restored" in director.restore_basket(load_basket())
    first = snapshot(director)
    # passive (external reference), 2 commands, 3 templates
    assert first["activity"] == before + 6
    assert first["fields"] == EXPECTED_FIELDS

    lag = first["commands"]["zettabee_lag"]
    assert lag["command"] == "PluginDir + /check_zettabee_lag"
    assert lag["methods_execute"] == "PluginCheck"
    assert set(lag["arguments"]) == {
        "--config",
        "--settings",
        "-w",
        "-c",
        "-t",
        "-v",
        "--all",
        "destination",
    }
    destination = lag["arguments"]["destination"]
    assert destination["skip_key"] is True
    assert destination["value"] == "$zettabee_lag_destination$"
    assert lag["arguments"]["--all"]["set_if"] == "$zettabee_lag_all$"
    assert lag["arguments"]["-w"]["value"] == "$zettabee_lag_warning$"
    assert lag["vars"] == {"zettabee_lag_all": False, "zettabee_lag_verbose": False}
    assert len(lag["fields"]) == 8

    runtime = first["commands"]["zettabee_runtime"]
    assert runtime["command"] == "PluginDir + /check_zettabee_runtime"
    assert runtime["arguments"]["destination"]["required"] is True
    assert len(runtime["fields"]) == 7
    assert [f["is_required"] for f in runtime["fields"]].count("y") == 1

    passive = first["templates"]["zettabee-passive"]
    assert passive["check_command"] == "passive"
    assert passive["enable_active_checks"] is True
    assert passive["check_interval"] == "1500"
    assert str(passive["max_check_attempts"]) == "1"
    assert passive["vars"]["dummy_state"] == 3
    assert first["templates"]["zettabee-lag"]["check_command"] == "zettabee_lag"
    assert first["templates"]["zettabee-runtime"]["check_command"] == "zettabee_runtime"
    assert 'command = [ PluginDir + "/check_zettabee_lag" ]' in first["rendered"][0]

    assert "restored" in director.restore_basket(load_basket())
    assert snapshot(director) == first


@pytest.mark.integration
def test_director_renders_valid_icinga2_config(director: DirectorLab, tmp_path: Path) -> None:
    """What the Director would deploy from the basket passes icinga2's validation."""
    from test_icinga_conf import Icinga2Sandbox, zettabee_services

    if shutil.which("icinga2") is None:
        pytest.skip("icinga2 not installed (Debian package icinga2)")
    director.restore_basket(load_basket())
    rendered = [director.render("command", name) for name in ("zettabee_lag", "zettabee_runtime")]
    rendered += [director.render("service", name) for name in TEMPLATES]

    sandbox = Icinga2Sandbox(tmp_path / "icinga2")
    (sandbox.etc / "director.conf").write_text("\n".join(rendered))
    (sandbox.etc / "hosts.conf").write_text(
        'object Host "backup1" { check_command = "dummy" }\n'
        'object Service "zettabee lag backup/data" {\n'
        '  host_name = "backup1"\n  import "zettabee-passive"\n}\n'
        'object Service "zettabee lag backup/home" {\n'
        '  host_name = "backup1"\n  import "zettabee-lag"\n'
        '  vars.zettabee_lag_destination = "backup/home"\n}\n'
        'object Service "zettabee runtime backup/home" {\n'
        '  host_name = "backup1"\n  import "zettabee-runtime"\n'
        '  vars.zettabee_runtime_destination = "backup/home"\n}\n'
    )
    sandbox.main_config('include "director.conf"', 'include "hosts.conf"')
    proc = sandbox.validate()
    assert proc.returncode == 0, proc.stdout

    services = zettabee_services(sandbox.objects("Service"))
    passive = services["backup1!zettabee lag backup/data"]
    assert passive["check_command"] == "passive"
    assert passive["check_interval"] == 1500
    assert passive["max_check_attempts"] == 1
    assert passive["enable_active_checks"] is True
    assert services["backup1!zettabee lag backup/home"]["check_command"] == "zettabee_lag"
    assert services["backup1!zettabee runtime backup/home"]["check_command"] == "zettabee_runtime"
