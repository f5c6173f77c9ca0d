"""Stand-in for modules/progress.py: the task bookkeeping behind /internal/progress, and that
route as A1111 1.10.1 answers it (``progressapi``: active/queued/completed, progress from
``job_no/job_count`` plus ``sampling_step/sampling_steps``, the ETA from the time since
``state.time_start``, the live preview as a data URI, ``textinfo``)."""
import base64
import io
import time

from pydantic import BaseModel

current_task = None
pending_tasks: dict = {}
finished_tasks: list = []
recorded_results: list = []
recorded_results_limit = 2


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def record_results(id_task, res):
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        recorded_results.pop(0)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


class ProgressRequest(BaseModel):
    id_task: str = None
    id_live_preview: int = -1
    live_preview: bool = True


class ProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: float = None
    eta: float = None
    live_preview: str = None
    id_live_preview: int = None
    textinfo: str = None


def setup_progress_api(app):
    return app.add_api_route("/internal/progress", progressapi, methods=["POST"], response_model=ProgressResponse)


def progressapi(req: ProgressRequest):
    from modules import shared

    active = req.id_task == current_task
    queued = req.id_task in pending_tasks
    completed = req.id_task in finished_tasks
    if not active:
        textinfo = "Waiting..."
        if queued:
            order = sorted(pending_tasks, key=pending_tasks.get)
            textinfo = f"In queue: {order.index(req.id_task) + 1}/{len(order)}"
        return ProgressResponse(active=active, queued=queued, completed=completed, id_live_preview=-1,
                                textinfo=textinfo)
    state = shared.state
    progress = 0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
        if state.sampling_steps > 0:
            progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    progress = min(progress, 1)
    elapsed = time.time() - state.time_start
    eta = elapsed / progress - elapsed if progress > 0 else None
    live_preview, id_live_preview = None, req.id_live_preview
    if shared.opts.live_previews_enable and req.live_preview:
        state.set_current_image()
        if state.id_live_preview != req.id_live_preview and state.current_image is not None:
            buffered = io.BytesIO()
            state.current_image.save(buffered, format="png")
            live_preview = "data:image/png;base64," + base64.b64encode(buffered.getvalue()).decode("ascii")
            id_live_preview = state.id_live_preview
    return ProgressResponse(active=active, queued=queued, completed=completed, progress=progress, eta=eta,
                            live_preview=live_preview, id_live_preview=id_live_preview, textinfo=state.textinfo)
