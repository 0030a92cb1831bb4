"""A fake of OpenAI's files and fine-tuning API with jobs that move on each read.

refused-model   creating a job answers 403 (no fine-tuning access)
fail-model      the job fails (invalid training file)
anything else   validating_files -> running -> succeeded, one step per GET
"""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import web

T = 1_700_000_000


class FakeFineTuning:
    url: str  # set by the test that serves it

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.counter = itertools.count(1)
        # Events and checkpoints are detail some OpenAI-compatible providers lack (404).
        self.detail_endpoints = True
        self.app = web.Application(client_max_size=50 * 1024 * 1024)
        self.app.router.add_post("/v1/files", self.upload)
        self.app.router.add_post("/v1/fine_tuning/jobs", self.create)
        self.app.router.add_get("/v1/fine_tuning/jobs/{id}", self.retrieve)
        self.app.router.add_get("/v1/fine_tuning/jobs/{id}/events", self.events)
        self.app.router.add_get("/v1/fine_tuning/jobs/{id}/checkpoints", self.checkpoints)
        self.app.router.add_post("/v1/fine_tuning/jobs/{id}/cancel", self.cancel)

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        field = form["file"]
        assert isinstance(field, web.FileField)
        content = field.file.read()
        file_id = f"file-{next(self.counter)}"
        self.files[file_id] = content
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": T,
                "filename": field.filename,
                "purpose": form["purpose"],
                "status": "processed",
            }
        )

    def _job(self, job: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in job.items() if not key.startswith("_")}

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.created.append(body)
        if body["model"] == "refused-model":
            return web.json_response(
                {
                    "error": {
                        "message": "You do not have access to fine-tuning.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "model_not_available",
                    }
                },
                status=403,
            )
        job_id = f"ftjob-{next(self.counter)}"
        self.jobs[job_id] = {
            "id": job_id,
            "object": "fine_tuning.job",
            "model": body["model"],
            "created_at": T,
            "status": "validating_files",
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "hyperparameters": {"n_epochs": "auto"},
            "method": body.get("method"),
            "metadata": body.get("metadata"),
            "seed": body.get("seed", 0),
            "result_files": [],
            "trained_tokens": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "error": None,
            "organization_id": "org-fake",
            "_suffix": body.get("suffix") or "distilled",
        }
        return web.json_response(self._job(self.jobs[job_id]))

    async def retrieve(self, request: web.Request) -> web.Response:
        job = self.jobs[request.match_info["id"]]
        following = {"validating_files": "running", "running": "succeeded"}
        if job["status"] in following:
            job["status"] = following[job["status"]]
            if job["status"] == "succeeded" and job["model"] == "fail-model":
                job["status"] = "failed"
                job["error"] = {
                    "code": "invalid_training_file",
                    "message": "The file has 3 examples; at least 10 are required.",
                    "param": "training_file",
                }
            elif job["status"] == "succeeded":
                job["fine_tuned_model"] = f"ft:{job['model']}:acme:{job['_suffix']}:abc123"
                job["trained_tokens"] = 1234
                job["finished_at"] = T + 60
        return web.json_response(self._job(job))

    async def events(self, request: web.Request) -> web.Response:
        if not self.detail_endpoints:
            raise web.HTTPNotFound()
        job = self.jobs[request.match_info["id"]]
        events = [
            {
                "object": "fine_tuning.job.event",
                "id": "ev-1",
                "created_at": T,
                "level": "info",
                "message": "Validating training file",
                "type": "message",
                "data": {},
            }
        ]
        if job["status"] in ("running", "succeeded", "failed"):
            events.append(
                {
                    "object": "fine_tuning.job.event",
                    "id": "ev-2",
                    "created_at": T + 1,
                    "level": "info",
                    "message": "Step 1/2: training loss=1.20",
                    "type": "metrics",
                    "data": {"step": 1, "train_loss": 1.2, "valid_loss": 1.3},
                }
            )
        if job["status"] == "succeeded":
            events.append(
                {
                    "object": "fine_tuning.job.event",
                    "id": "ev-3",
                    "created_at": T + 2,
                    "level": "info",
                    "message": "Step 2/2: training loss=0.40",
                    "type": "metrics",
                    "data": {"step": 2, "train_loss": 0.4, "valid_loss": 0.5},
                }
            )
            events.append(
                {
                    "object": "fine_tuning.job.event",
                    "id": "ev-4",
                    "created_at": T + 3,
                    "level": "info",
                    "message": "The job has successfully completed",
                    "type": "message",
                    "data": {},
                }
            )
        if job["status"] == "failed":
            events.append(
                {
                    "object": "fine_tuning.job.event",
                    "id": "ev-5",
                    "created_at": T + 3,
                    "level": "error",
                    "message": "The job failed",
                    "type": "message",
                    "data": {},
                }
            )
        return web.json_response(
            {"object": "list", "data": list(reversed(events)), "has_more": False}
        )

    async def checkpoints(self, request: web.Request) -> web.Response:
        if not self.detail_endpoints:
            raise web.HTTPNotFound()
        job = self.jobs[request.match_info["id"]]
        data = (
            [
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{step}",
                    "created_at": T + step,
                    "fine_tuned_model_checkpoint": f"ft:{job['model']}:acme:{job['_suffix']}:abc123:ckpt-step-{step}",
                    "step_number": step,
                    "fine_tuning_job_id": job["id"],
                    "metrics": {
                        "step": step,
                        "train_loss": loss,
                        "train_mean_token_accuracy": 0.9,
                        "valid_loss": loss + 0.1,
                        "valid_mean_token_accuracy": 0.88,
                        "full_valid_loss": loss + 0.1,
                        "full_valid_mean_token_accuracy": 0.88,
                    },
                }
                for step, loss in ((1, 1.2), (2, 0.4))
            ]
            if job["status"] == "succeeded"
            else []
        )
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        job = self.jobs[request.match_info["id"]]
        job["status"] = "cancelled"
        return web.json_response(self._job(job))
