"""Peak training-step memory of DY-ResNet-18 / DY-MobileNetV2 vs static and naive (batch 32, 112²)."""

import sys

from dyconv.benchmark import NETWORKS, network_training_memory

if __name__ == "__main__":
    for name in sys.argv[1:] or NETWORKS:
        peaks = network_training_memory(name)
        ratios = ", ".join(f"{side} {peaks[side] / 2**20:.0f} MB ({peaks[side] / peaks['static']:.2f}x)"
                           for side in peaks)
        print(f"{name}: {ratios}", flush=True)
