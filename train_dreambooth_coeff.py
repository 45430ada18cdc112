#!/usr/bin/env python
"""DreamBooth for SDXL with Coeff-Tuning (alpha), LoRA, or both.

    accelerate launch train_dreambooth_coeff.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_dir ./my_dog --instance_prompt "a photo of sks dog" --output_dir runs/dog-coeff

A thin entry point: the work lives in `dreamcoeff.train` (see `--help` for every flag).
"""

import sys

from dreamcoeff.train import main

if __name__ == "__main__":
    sys.exit(main())
