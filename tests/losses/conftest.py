import sys
from pathlib import Path

# Lets the test modules import the plain-python `_losses_hand` helpers next to them.
sys.path.insert(0, str(Path(__file__).parent))
