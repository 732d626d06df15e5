// Holds one token cache secret per mailbox (and, in secret mode only, the Entra client secret).
param name string
param location string = resourceGroup().location
param tags object = {}

// Purge protection is off by default, on purpose. Everything in this vault can be recreated: a token cache by
// signing the mailbox in again, the client secret by issuing a new one. With purge protection on, a vault can never
// be purged before its retention ends, so `azd down --purge` leaves the name blocked and the next `azd up` of the
// same environment fails. Production can switch it on (keyVaultPurgeProtection=true); it can never be switched off.
@description('Purge protection; once true it cannot be turned off.')
param enablePurgeProtection bool = false

// Soft delete is always on (the platform no longer allows it off); the shortest retention keeps the name free soon
// after a deliberate teardown while still covering an accidental delete.
@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int = 7

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_110: purge protection is the parameter above, off by default so azd down --purge frees the name
  //checkov:skip=CKV_AZURE_42: soft delete is always on; this check also wants purge protection (see above)
  //checkov:skip=CKV_AZURE_109: Flex Consumption without VNet integration has no fixed egress address; Entra RBAC is the gate
  //checkov:skip=CKV_AZURE_189: the app reaches the vault over its public endpoint (no VNet); RBAC only, no access policies
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    // ARM refuses an explicit false: "off" has to be an absent property.
    enablePurgeProtection: enablePurgeProtection ? true : null
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

output name string = keyVault.name
output resourceId string = keyVault.id
output uri string = keyVault.properties.vaultUri
