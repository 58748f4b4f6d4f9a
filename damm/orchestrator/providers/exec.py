"""The ``exec`` provider: the operator's own executable, one JSON request per call.

The contract, so a Terraform wrapper, a cloud CLI or an Ansible play can be a provider:
- DAMM runs ``command`` (from the topology) with one JSON object on stdin:
  ``{"op": "create", "gateway_id", "region", "token", "nats_url", "front_doors": [...]}``,
  ``{"op": "destroy", "gateway_id"}``, ``{"op": "add_front_door", "gateway_id",
  "front_door_id"}``, ``{"op": "remove_front_door", ...}``, ``{"op": "add_egress", "pool_id",
  "region", "country"}`` or ``{"op": "list"}``.
- It answers with one JSON value on stdout and exit status 0: a host
  (``{"gateway_id", "region", "provider_ref", "state": "running"|"broken", "front_doors":
  {"fd1": "host:port"}}``) for create, a list of hosts for list, ``{"endpoint": "host:port"}``
  for add_front_door, ``{"ips": ["cidr", ...]}`` for add_egress, anything for the others.
- Every op must be idempotent: an apply may be killed and run again.
- A non-zero exit, a timeout or an answer of the wrong shape is ``provider_failed`` with the
  last line of stderr. The token is on stdin only, never in argv or the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from typing import Any, TypeVar

import msgspec

from damm.errors import Code, DammError
from damm.orchestrator.providers.base import Host, HostSpec
from damm.orchestrator.topology import Provider as ProviderSpec

T = TypeVar("T")
MAX_ANSWER = 1 << 20


class _Endpoint(msgspec.Struct):
    endpoint: str


class _Ips(msgspec.Struct):
    ips: tuple[str, ...]


class ExecProvider:
    def __init__(self, name: str, spec: ProviderSpec, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.spec = spec
        self.env = env

    async def _call(self, request: dict[str, Any], answer: type[T]) -> T:
        op = request["op"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.spec.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                start_new_session=True,  # so a timeout ends the script and all it started
            )
        except OSError as exc:
            raise DammError(Code.PROVIDER_FAILED, f"{self.name} {op}: {exc}") from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(msgspec.json.encode(request)), self.spec.timeout_s
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise DammError(
                Code.PROVIDER_FAILED, f"{self.name} {op}: no answer in {self.spec.timeout_s:g}s"
            ) from None
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or ["(no stderr)"]
            raise DammError(
                Code.PROVIDER_FAILED, f"{self.name} {op}: exit {proc.returncode}: {lines[-1]}"
            )
        if len(out) > MAX_ANSWER:
            raise DammError(Code.PROVIDER_FAILED, f"{self.name} {op}: answer over {MAX_ANSWER} B")
        try:
            return msgspec.json.decode(out, type=answer)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DammError(Code.PROVIDER_FAILED, f"{self.name} {op}: answer: {exc}") from None

    async def create(self, spec: HostSpec) -> Host:
        request = {"op": "create", **msgspec.structs.asdict(spec)}
        return await self._call(request, Host)

    async def destroy(self, gateway_id: str) -> None:
        await self._call({"op": "destroy", "gateway_id": gateway_id}, Any)

    async def add_front_door(self, gateway_id: str, front_door_id: str) -> str:
        request = {"op": "add_front_door", "gateway_id": gateway_id, "front_door_id": front_door_id}
        return (await self._call(request, _Endpoint)).endpoint

    async def remove_front_door(self, gateway_id: str, front_door_id: str) -> None:
        request = {
            "op": "remove_front_door",
            "gateway_id": gateway_id,
            "front_door_id": front_door_id,
        }
        await self._call(request, Any)

    async def add_egress(self, pool_id: str, region: str, country: str) -> tuple[str, ...]:
        request = {"op": "add_egress", "pool_id": pool_id, "region": region, "country": country}
        return (await self._call(request, _Ips)).ips

    async def list(self) -> list[Host]:
        return await self._call({"op": "list"}, list[Host])
