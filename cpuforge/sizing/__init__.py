"""What each rule needs before it runs (memory, disk, time), predicted from headers; the preflight and the plan."""
