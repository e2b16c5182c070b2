"""python -m dist_resnet.sweep ..."""
from .cli import main

main()
