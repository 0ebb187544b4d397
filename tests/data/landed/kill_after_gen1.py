import os, signal, sys
import torch
import kecompress.evolution as loop
from kecompress.cli import main
torch.set_num_threads(1)
original = loop.save_json
def save_then_die(obj, path):
    original(obj, path)
    if len(obj["generations"]) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
loop.save_json = save_then_die
sys.exit(main(sys.argv[1:]))
