from defectscan.cli import main

main()
