"""Stand-in for modules/call_queue.py: one FIFO lock for everything that uses the GPU, and
the wrappers A1111 puts around gradio handlers (task id bookkeeping, error → HTML)."""
import html
import threading

from modules import errors, progress, shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        # A first argument "task(<id>)" is the page's job id (randomId() in progressbar.js).
        if args and isinstance(args[0], str) and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None
        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.print_error("Error completing request", exc_info=True)
            shared.state.job = ""
            shared.state.job_count = 0
            if extra_outputs_array is None:
                extra_outputs_array = [None, ""]
            error_message = f"{type(e).__name__}: {e}"
            res = list(extra_outputs_array) + [f"<div class='error'>{html.escape(error_message)}</div>"]

        shared.state.skipped = False
        shared.state.interrupted = False
        shared.state.job_count = 0
        if add_stats:
            res[-1] += "<div class='performance'><p class='time'>Time taken: <wbr>0.00s</p></div>"
        return tuple(res)

    return f
