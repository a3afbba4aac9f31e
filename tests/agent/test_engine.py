"""The engine's threads: torch computes on several threads only on the model thread."""
import threading

import torch

from agent.engine import light_torch_thread


def test_a_light_torch_thread_computes_on_one_thread_after_the_model_thread_sets_its_own_count():
    # The event loop's thread is set up before the model thread sets 2 threads for a
    # forward; its next op must not take that count (a second OpenMP team on 2 cores
    # slowed every forward on the model thread by 40%).
    set_up, model_thread_done, seen = threading.Event(), threading.Event(), []

    def event_loop_thread():
        light_torch_thread()
        set_up.set()
        model_thread_done.wait()
        seen.append(torch.get_num_threads())

    loop = threading.Thread(target=event_loop_thread)
    loop.start()
    set_up.wait()
    model = threading.Thread(target=torch.set_num_threads, args=(2,))
    model.start()
    model.join()
    model_thread_done.set()
    loop.join()
    assert seen == [1]


def test_an_engine_sharing_the_model_thread_leaves_it_running_when_closed():
    from agent.config import Config
    from agent.engine import Engine

    engine = Engine(Config(), None, None, None)  # no models: only the threads are under test
    standin = engine.sharing(head="a stand-in head")
    assert standin.model_worker is engine.model_worker and standin.head == "a stand-in head"
    standin.close()
    assert engine.model_executor.submit(lambda: 2 + 2).result(timeout=5) == 4
    engine.close()
